"""Do the shapes users bring learn as well as the same data written as `messages`? Whole runs, scored per dataset.

    .venv/bin/python bench/bench_shapes.py [--steps 40] [--gemma] [--json OUT.json]

Run "shapes": one run on a list of two datasets, the Alpaca .jsonl and the ShareGPT .parquet of data/ (see
data/make_shapes.py), each with its own test file in the same shape, no mapping keys. Run "messages": the same rows
written as `messages` (the Alpaca rows as a user turn, instruction and input on two lines, and the output as the reply;
the ShareGPT rows are data/demo_tools_*.jsonl, which they were written from), same steps and settings. Both on
SmolLM2-135M-Instruct with chat_template qwen, LoRA, the default precision, scored before and after on 60 test rows
of each dataset. With --gemma, a third run: the Alpaca task alone on Gemma 3 270M base, in raw prompts (Stanford
Alpaca's layout). Each run is `finetune.py --config` in a process of its own; its eval.json gives the scores.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402


def alpaca_as_messages(source: Path, dest: Path) -> Path:
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    dest.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"{r['instruction']}\n{r['input']}" if r["input"] else r["instruction"]},
        {"role": "assistant", "content": r["output"]}]}) + "\n" for r in rows))
    return dest


def run(name: str, values: dict, folder: Path) -> dict:
    config = folder / f"{name}.yml"
    config.write_text(json.dumps({**values, "output_dir": str(folder / name)}))  # JSON is YAML
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    summary = json.loads((folder / name / "eval.json").read_text())
    table = result.stdout[result.stdout.rindex("metric"):].split("\nsaved to")[0]
    print(f"\n== {name}: {wall:.0f} s\n{table}", flush=True)
    return {"wall_s": round(wall, 1), "base": summary.get("base"), "fine_tuned": summary["fine_tuned"],
            "data": summary["data"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--gemma", action="store_true", help="also the Alpaca task on Gemma 3 270M base")
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args()
    common = dict(model_name=str(ROOT / finetune.EMBEDDED_MODEL), chat_template="qwen", seq_length=640,
                  learning_rate=0.002, max_steps=args.steps, eval_strategy="no", save_strategy="no",
                  validation_split=0, eval_max_examples=120, eval_max_new_tokens=64, seed=1234)
    print("command:", shlex.join(sys.orig_argv))
    print(f"CPU kind {finetune.cpu_flags() & {'amx_bf16', 'avx512_bf16', 'avx2'}}, {os.cpu_count()} cores")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_shapes-") as tmp:
        folder = Path(tmp)
        results["shapes"] = run("shapes", {**common, "dataset_name": [
            str(DATA / "demo_alpaca_train.jsonl"), str(DATA / "demo_sharegpt_train.parquet")], "test_dataset": [
            str(DATA / "demo_alpaca_test.jsonl"), str(DATA / "demo_sharegpt_test.parquet")]}, folder)
        results["messages"] = run("messages", {**common, "dataset_name": [
            str(alpaca_as_messages(DATA / "demo_alpaca_train.jsonl", folder / "alpaca_train.jsonl")),
            str(DATA / "demo_tools_train.jsonl")], "test_dataset": [
            str(alpaca_as_messages(DATA / "demo_alpaca_test.jsonl", folder / "alpaca_test.jsonl")),
            str(DATA / "demo_tools_test.jsonl")]}, folder)
        if args.gemma:
            results["gemma-alpaca-raw"] = run("gemma-alpaca-raw", {
                **common, "model_name": str(ROOT / finetune.SECOND_MODEL), "chat_template": None,
                "prompt_format": "raw", "dataset_name": str(DATA / "demo_alpaca_train.jsonl"),
                "test_dataset": str(DATA / "demo_alpaca_test.jsonl"), "eval_max_examples": 60}, folder)
    print("\nexact match by dataset (fine-tuned): shapes vs messages")
    for (shaped, a), (written, b) in zip(results["shapes"]["fine_tuned"]["by_dataset"].items(),
                                         results["messages"]["fine_tuned"]["by_dataset"].items()):
        print(f"  {Path(shaped).name}: {a['exact_match']:.3f}   {Path(written).name}: {b['exact_match']:.3f}   "
              f"difference {100 * (a['exact_match'] - b['exact_match']):+.1f} points")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.orig_argv, "cpu": sorted(finetune.cpu_flags() & {
            "amx_bf16", "avx512_bf16", "avx2"}), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
