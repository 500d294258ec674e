"""The memory estimate (`--estimate`) against the measured peak of whole runs: both real models, both precisions, and
LoRA, LoRA + gradient checkpointing, QLoRA (4-bit) and full fine-tunes.

    .venv/bin/python bench/bench_memory.py [--models smollm2 gemma3] [--precisions fp32 bf16] [--json OUT]
    .venv/bin/python bench/bench_memory.py --long 150 [--precisions bf16]    # how the peak grows over a long run

Each run is `python finetune.py` in a fresh child process, as a user runs it (its allocator settings included): two
steps of batch_size x seq_length tokens of long rows (every batch full), an evaluation, the base and fine-tuned models
scored on 20 test prompts. Measured: what the run writes to eval.json, the peak of each phase (sampled) and of the
whole process (the kernel's high-water mark). tests/test_estimate.py runs the same measurement on four cells. The CPU
kind is printed: only same-run ratios compare across machines. A benchmark, not a test.

--long STEPS: a run that two steps cannot show. The function-calling recipe (rows of ~550 tokens, of varying length)
trains STEPS steps with nothing else (no evaluation, scoring or checkpoint), its resident memory sampled every 20 ms
beside the step it is at, once with finetune.py's allocator settings and once with glibc's defaults: how far the peak
climbs after the first steps, and whether the allocator is why.
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

import finetune  # noqa: E402  (the repository root is not on the path when this file is run as a script)

MODELS = {"smollm2": ROOT / finetune.EMBEDDED_MODEL, "gemma3": ROOT / finetune.SECOND_MODEL}
METHODS = {"lora": {"gradient_checkpointing": False}, "lora-checkpointing": {"gradient_checkpointing": True},
           "qlora-4bit": {"load_in_4bit": True, "gradient_checkpointing": False},
           "full": {"use_peft": False, "gradient_checkpointing": False}}
WORDS = "the model learns to answer questions about data and code with short precise sentences".split()


def cpu_kind() -> str:
    flags = finetune.cpu_flags()
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "AVX2 (no bf16 units)"


def write_data(folder: Path, stage: str = "sft") -> tuple[Path, Path]:
    """(training rows longer than any seq_length here, 20 of the demo's test prompts); for a preference stage, pairs
    (dpo) or labelled rows (kto) whose answers are that long, and test rows of the same shape."""
    def words(i: int, n: int) -> str:
        return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))

    train, test = folder / f"long-{stage}.jsonl", folder / f"test-{stage}.jsonl"
    tests = [json.loads(line) for line in (ROOT / "data" / "demo_test.jsonl").read_text().splitlines()[:20]]
    if stage == "sft":
        rows = [{"text": words(i, 600)} for i in range(32)]
    elif stage == "dpo":
        rows = [{"prompt": words(i, 8), "chosen": words(i + 1, 600), "rejected": words(i + 2, 600)} for i in range(32)]
        tests = [{"prompt": t["prompt"], "chosen": t["completion"], "rejected": t["completion"][::-1]} for t in tests]
    else:
        rows = [{"prompt": words(i, 8), "completion": words(i + 1, 600), "label": i % 2 == 0} for i in range(32)]
        tests = [{"prompt": t["prompt"], "completion": t["completion"], "label": True} for t in tests]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test.write_text("".join(json.dumps(t) + "\n" for t in tests))
    return train, test


def settings(model: Path, precision: str, method: str, data: tuple[Path, Path], out: Path, batch_size: int = 4,
             seq_length: int = 256, stage: str = "sft") -> dict:
    return {"model_name": str(model), "stage": stage, "dataset_name": str(data[0]), "test_dataset": str(data[1]),
            "precision": precision, "batch_size": batch_size, "seq_length": seq_length, "max_steps": 2,
            "validation_split": 0.25, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "no",
            "eval_before": True, "eval_max_new_tokens": 16, "prompt_format": "raw", "output_dir": str(out),
            **METHODS[method]}


def measure(values: dict, folder: Path) -> dict:
    """Run finetune.py on these config values: {estimate: phases, measured: peak bytes, phases: measured phases}."""
    config = folder / "config.yml"
    config.write_text(json.dumps(values))  # JSON is YAML
    child = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--config", str(config)], cwd=folder,
                           capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"finetune.py failed ({child.returncode}):\n{child.stderr[-3000:]}")
    memory = json.loads((Path(values["output_dir"]) / "eval.json").read_text())["memory"]
    cfg = finetune.Config(**values)
    model_config = finetune.load_model_config(cfg)
    plan = finetune.make_plan(cfg, None, model_config, finetune.this_machine())
    return {"estimate": finetune.estimate_phases(cfg, model_config, plan), "measured": memory["peak_bytes"],
            "phases": memory["phases"]}


ALLOCATORS = {"finetune.py's (tunables)": {}, "glibc defaults": {"FINETUNE_NO_REEXEC": "1"}}


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def long_run(steps: int, precision: str, folder: Path, env: dict) -> list[int]:
    """The peak resident bytes at each step of a long run of the function-calling recipe (index 0: before step 1)."""
    import yaml

    values = yaml.safe_load((ROOT / "recipes" / "function-calling.yml").read_text())
    values.update(model_name=str(ROOT / values["model_name"]), dataset_name=str(ROOT / values["dataset_name"]),
                  test_dataset=None, validation_split=0, eval_strategy="no", eval_before=False, save_strategy="no",
                  logging_steps=1, max_steps=steps, precision=precision, output_dir=str(folder / "run"))
    config = folder / "config.yml"
    config.write_text(json.dumps(values))
    metrics = folder / "run" / "metrics.jsonl"
    child = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), "--config", str(config)], cwd=folder,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **env})
    peaks = [0] * (steps + 1)
    while child.poll() is None:
        try:
            done = metrics.read_text().count('"loss"') if metrics.exists() else 0
            peaks[min(done, steps)] = max(peaks[min(done, steps)], resident_bytes(child.pid))
        except (OSError, ValueError):  # the process ended between the two reads
            pass
        time.sleep(0.02)
    if child.returncode != 0:
        raise RuntimeError(f"finetune.py failed ({child.returncode}):\n{child.stderr.read()[-3000:]}")
    return peaks


def report_long(steps: int, precisions: list[str]) -> list[dict]:
    print(f"CPU: {cpu_kind()}; function-calling recipe, {steps} steps; peak resident GiB up to each step")
    marks = sorted({1, 2, 5, steps // 10, steps // 4, steps // 2, steps} - {0})
    print(f"{'precision':<10}{'allocator':<26}" + "".join(f"{'step ' + str(m):>10}" for m in marks) + f"{'growth':>9}")
    results = []
    for precision in precisions:
        for name, env in ALLOCATORS.items():
            with tempfile.TemporaryDirectory() as tmp:
                peaks = long_run(steps, precision, Path(tmp), env)
            running = [max(peaks[:i + 1]) for i in range(len(peaks))]
            growth = running[-1] / running[min(5, steps)] - 1  # after the first 5 steps, which see most lengths
            print(f"{precision:<10}{name:<26}" + "".join(f"{running[m] / 2**30:>10.2f}" for m in marks)
                  + f"{growth:>8.1%}", flush=True)
            results.append({"precision": precision, "allocator": name, "peak_by_step": peaks})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--stage", choices=["sft", "dpo", "kto"], default="sft")
    parser.add_argument("--json", metavar="OUT.json")
    parser.add_argument("--long", type=int, metavar="STEPS", help="how the peak grows over a long run, instead")
    args = parser.parse_args()
    if args.long:
        results = report_long(args.long, args.precisions)
        if args.json:
            Path(args.json).write_text(json.dumps({"cpu": cpu_kind(), "long_runs": results}, indent=2))
        return
    print(f"CPU: {cpu_kind()}; stage {args.stage}")
    print(f"{'model':<9}{'precision':<10}{'method':<20}{'estimate':>10}{'measured':>10}{'ratio':>7}  phases (GiB)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp), args.stage)
        for model in args.models:
            for precision in args.precisions:
                for method in args.methods:
                    folder = Path(tempfile.mkdtemp(dir=tmp))
                    found = measure(settings(MODELS[model], precision, method, data, folder / "run",
                                             stage=args.stage), folder)
                    estimate = found["estimate"]["whole run"]
                    phases = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in found["phases"].items())
                    print(f"{model:<9}{precision:<10}{method:<20}{estimate / 2**30:>10.2f}"
                          f"{found['measured'] / 2**30:>10.2f}{estimate / found['measured']:>7.2f}  {phases}",
                          flush=True)
                    results.append({"model": model, "precision": precision, "method": method, **found})
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_kind(), "stage": args.stage, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
