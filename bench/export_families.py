"""GGUF export of every family users bring, checked in llama.cpp: tiny random-weight models of Qwen2, Qwen3, Llama 3,
Mistral, Gemma 3 and Phi-3, each with its family's real tokenizer, trained 2 LoRA steps, merged, exported to every
type, and run by llama.cpp against the merged model (transformers, fp32).

    .venv/bin/python bench/export_families.py [--families qwen2 ...] [--types f16 q8_0 ...]

Per family and type: the file size, the export time, and over the prompt's positions the share where llama.cpp's
next-token choice equals the merged model's and the largest logit difference (relative to the largest logit).
Random weights make near-ties, so a quantized type's agreement is a floor, not a quality figure. Writes
bench/results/export-families-<cpu kind>.json. The tests read the f16 files back with transformers; this is the
llama.cpp side (the llama.cpp build export uses, with its Python binding).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402

VOCAB = ROOT / "models" / "vocab"  # llama.cpp's vocabulary-only GGUF files (./setup.sh --test-models)
# family -> (model_type, config changes, tokenizer (a file in VOCAB, or Gemma's own), GGUF architecture)
FAMILIES = {
    "qwen2": ("qwen2", {}, "qwen2", "qwen2"),
    "qwen3": ("qwen3", {}, "qwen2", "qwen3"),
    "llama3": ("llama", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024}}, "llama-bpe", "llama"),
    "mistral": ("mistral", {"sliding_window": None}, "llama-spm", "llama"),
    "gemma3": ("gemma3_text", {}, "gemma", "gemma3"),
    "phi3": ("phi3", {"tie_word_embeddings": False}, "phi-3", "phi3"),
}
PROMPT = "Request: a table for two at 7pm\nJSON:"
LLAMA_LOGITS = """\
import json, sys
import numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, seed=0, logits_all=True, verbose=False)
llm.eval(json.load(sys.stdin))
np.save(sys.argv[2], np.asarray(llm.scores[:llm.n_tokens], dtype=np.float32))
"""


def family_tokenizer(name: str, folder: Path) -> Path:
    """A family's real tokenizer as a folder: from llama.cpp's vocabulary-only GGUF file, or Gemma 3's own."""
    from transformers import AutoTokenizer

    if name == "gemma":
        return ROOT / finetune.SECOND_MODEL
    if not (VOCAB / f"ggml-vocab-{name}.gguf").exists():
        sys.exit(f"{VOCAB} is missing: run ./setup.sh --test-models first")
    AutoTokenizer.from_pretrained(VOCAB, gguf_file=f"ggml-vocab-{name}.gguf").save_pretrained(folder)
    return folder


def tiny_family_model(out: Path, family: str, tokenizer_dir: Path, **changes) -> Path:
    """A 2-layer random-weight (seeded) model of a family, with the tokenizer in tokenizer_dir; changes to its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(FAMILIES[family][0], **{
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, **FAMILIES[family][1], **changes})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--types", nargs="+", default=list(finetune.GGUF_TYPES.__args__))
    args = parser.parse_args()
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    rows, binding = [], {**os.environ, "PYTHONPATH": str(finetune.llama_cpp_tools() / "python")}
    data = [json.loads(line) for line in (ROOT / "data" / "demo_train.jsonl").read_text().splitlines()[:8]]
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            folder = Path(tmp) / family
            model = tiny_family_model(folder / "model", family,
                                      family_tokenizer(FAMILIES[family][2], folder / "tokenizer"))
            (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
            cfg = finetune.Config(model_name=str(model), dataset_name=str(folder / "data.jsonl"), max_steps=2,
                                  batch_size=4, learning_rate=5e-2, peft_lora_alpha=64, validation_split=0,
                                  eval_strategy="no", save_strategy="no", eval_before=False, precision="fp32",
                                  merge_adapter=True, output_dir=str(folder / "run"))
            run = finetune.open_run(finetune.run_training(cfg))
            ids = run.tokenizer(PROMPT).input_ids
            with torch.no_grad():
                merged = AutoModelForCausalLM.from_pretrained(run.folder / "merged", dtype=torch.float32)
                reference = merged(torch.tensor([ids])).logits[0]
            for gguf_type in args.types:
                started = time.perf_counter()
                path = finetune.export_run(run, gguf_type)
                seconds = time.perf_counter() - started
                subprocess.run([sys.executable, "-c", LLAMA_LOGITS, str(path), str(folder / "logits.npy")],
                               input=json.dumps(ids), capture_output=True, text=True, check=True, env=binding)
                logits = torch.from_numpy(np.load(folder / "logits.npy"))
                rows.append({"family": family, "type": gguf_type, "mib": path.stat().st_size / 2**20,
                             "export_s": seconds, "positions": len(ids),
                             "same_choice": int((logits.argmax(-1) == reference.argmax(-1)).sum()),
                             "max_logit_error": float((logits - reference).abs().max() / reference.abs().max())})
                print(json.dumps(rows[-1]), flush=True)
    print(f"{'family':<9}{'type':<6}{'MiB':>8}{'export s':>10}{'llama.cpp same choice':>23}{'max logit error':>17}")
    for r in rows:
        print(f"{r['family']:<9}{r['type']:<6}{r['mib']:8.1f}{r['export_s']:10.1f}"
              f"{r['same_choice']:>17}/{r['positions']:<5}{r['max_logit_error']:17.4f}")
    kind = "-".join(sorted(finetune.cpu_flags() & {"avx2", "avx512_bf16", "amx_bf16"})) or "cpu"
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / f"export-families-{kind}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
