"""GGUF export checked by its consumers: transformers' GGUF reader and llama.cpp itself, against the merged model.

    .venv/bin/python bench/export_check.py RUN_FOLDER [--types f16 q8_0 ...] [--llama-venv bench/.llama-venv]

For each type (by default every type `export` writes): export the finished run (timed; file size), answer its test
prompts greedily with the merged model (transformers, as `merge` writes it), with the file through transformers' GGUF
reader, and with the file in llama.cpp (llama-cpp-python, which compiles llama.cpp from source: it lives in its own
virtualenv, built on first use, because the build takes many minutes; the build time is printed). It reports how many
answers equal the merged model's, and each side's exact match against the references. Writes
bench/results/export-<cpu kind>.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# Text-only, portable build: no multimodal library (a sixth of the compile), no -march=native (a wheel that runs on
# another CPU of the same family).
LLAMA_CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"
LLAMA_GREEDY = """\
import json, sys
from llama_cpp import Llama, llama_cpp
path, max_new = sys.argv[1], int(sys.argv[2])
llm = Llama(model_path=path, n_ctx=1024, n_threads=os.cpu_count(), seed=0, verbose=False)
out = []
for ids in json.load(sys.stdin):
    answer = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):  # greedy; generate() never stops itself
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(answer) == max_new:
            break
        answer.append(token)
    out.append(answer)
print(json.dumps(out))
""".replace("import json, sys", "import json, os, sys")


def llama_python(venv: Path) -> Path:
    """The python of a virtualenv with llama-cpp-python, built on first use (its build time printed)."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    started = time.perf_counter()
    subprocess.run([python, "-m", "pip", "install", "--quiet", LLAMA_CPP_PYTHON], check=True,
                   env={**os.environ, "CMAKE_ARGS": LLAMA_CMAKE_ARGS})
    print(f"built {LLAMA_CPP_PYTHON} from source in {time.perf_counter() - started:.0f} s ({os.cpu_count()} cores)")
    return python


def exact(answers: list[str], pairs) -> float:
    return sum(a.strip() == p.reference.strip() for a, p in zip(answers, pairs)) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--types", nargs="+", default=list(finetune.GGUF_TYPES.__args__))
    parser.add_argument("--llama-venv", type=Path, default=ROOT / "bench" / ".llama-venv")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    run = finetune.open_run(args.run)
    cfg, tokenizer, pairs = run.cfg, run.tokenizer, run.test_pairs
    reference, _ = finetune.generate_answers(finetune.merged_model(run).float(), tokenizer, [p.ids for p in pairs],
                                             cfg.eval_max_new_tokens, run.plan.stop_ids)
    python = llama_python(args.llama_venv)
    rows = []
    for gguf_type in args.types:
        started = time.perf_counter()
        path = finetune.export_run(run, gguf_type)
        seconds = time.perf_counter() - started
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        via_transformers, _ = finetune.generate_answers(model, tokenizer, [p.ids for p in pairs],
                                                        cfg.eval_max_new_tokens, run.plan.stop_ids)
        done = subprocess.run([python, "-c", LLAMA_GREEDY, str(path), str(cfg.eval_max_new_tokens)],
                              input=json.dumps([p.ids for p in pairs]), capture_output=True, text=True, check=True)
        via_llama = tokenizer.batch_decode(json.loads(done.stdout), skip_special_tokens=True)
        rows.append({"type": gguf_type, "mib": path.stat().st_size / 2**20, "export_s": seconds,
                     "transformers_same": sum(a == b for a, b in zip(via_transformers, reference)),
                     "llama_cpp_same": sum(a.strip() == b.strip() for a, b in zip(via_llama, reference)),
                     "transformers_exact": exact(via_transformers, pairs), "llama_cpp_exact": exact(via_llama, pairs),
                     "llama_cpp_answers": via_llama[:3]})
    n = len(pairs)
    print(f"{n} test prompts; merged model's exact match {exact(reference, pairs):.3f}")
    print(f"{'type':<6}{'MiB':>8}{'export s':>10}{'transformers: same':>20}{'exact':>8}{'llama.cpp: same':>17}"
          f"{'exact':>8}")
    for r in rows:
        print(f"{r['type']:<6}{r['mib']:8.1f}{r['export_s']:10.1f}{r['transformers_same']:>14}/{n:<5}"
              f"{r['transformers_exact']:8.3f}{r['llama_cpp_same']:>11}/{n:<5}{r['llama_cpp_exact']:8.3f}")
    kind = "-".join(sorted(finetune.cpu_flags() & {"avx2", "avx512_bf16", "amx_bf16"})) or "cpu"
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / f"export-{kind}.json").write_text(json.dumps(
        {"run": str(args.run), "prompts": n, "merged_exact": exact(reference, pairs), "types": rows,
         "reference_answers": reference[:3]}, indent=2))


if __name__ == "__main__":
    main()
