"""The memory estimate (`--estimate`) against the measured peak of whole runs: both real models, both precisions, and
LoRA, LoRA + gradient checkpointing, QLoRA (4-bit) and full fine-tunes.

    .venv/bin/python bench/bench_memory.py [--models smollm2 gemma3] [--precisions fp32 bf16] [--json OUT]

Each run is `python finetune.py` in a fresh child process, as a user runs it (its allocator settings included): two
steps of batch_size x seq_length tokens of long rows (every batch full), an evaluation, the base and fine-tuned models
scored on 20 test prompts. Measured: what the run writes to eval.json, the peak of each phase (sampled) and of the
whole process (the kernel's high-water mark). tests/test_estimate.py runs the same measurement. The CPU kind is
printed: only same-run ratios compare across machines. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
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


def write_data(folder: Path) -> tuple[Path, Path]:
    """(training rows longer than any seq_length here, 20 of the demo's test prompts)."""
    train = folder / "long.jsonl"
    train.write_text("".join(json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(600))}) + "\n"
                             for i in range(32)))
    test = folder / "test.jsonl"
    test.write_text("".join((ROOT / "data" / "demo_test.jsonl").read_text().splitlines(keepends=True)[:20]))
    return train, test


def settings(model: Path, precision: str, method: str, data: tuple[Path, Path], out: Path, batch_size: int = 4,
             seq_length: int = 256) -> dict:
    return {"model_name": str(model), "dataset_name": str(data[0]), "test_dataset": str(data[1]),
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
    plan = finetune.make_plan(cfg, None, model_config)
    return {"estimate": finetune.estimate_phases(cfg, model_config, plan), "measured": memory["peak_bytes"],
            "phases": memory["phases"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args()
    print(f"CPU: {cpu_kind()}")
    print(f"{'model':<9}{'precision':<10}{'method':<20}{'estimate':>10}{'measured':>10}{'ratio':>7}  phases (GiB)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp))
        for model in args.models:
            for precision in args.precisions:
                for method in args.methods:
                    folder = Path(tempfile.mkdtemp(dir=tmp))
                    found = measure(settings(MODELS[model], precision, method, data, folder / "run"), folder)
                    estimate = found["estimate"]["whole run"]
                    phases = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in found["phases"].items())
                    print(f"{model:<9}{precision:<10}{method:<20}{estimate / 2**30:>10.2f}"
                          f"{found['measured'] / 2**30:>10.2f}{estimate / found['measured']:>7.2f}  {phases}",
                          flush=True)
                    results.append({"model": model, "precision": precision, "method": method, **found})
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_kind(), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
