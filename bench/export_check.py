"""Every GGUF type of a finished run, exported and scored in llama.cpp as `export` scores it: the README's table.

    .venv/bin/python bench/export_check.py RUN_FOLDER [--types q4_k_m q8_0 ...] [--imatrix-both q3_k_m ...]
                                          [--examples 50]

For each type: `export` of the run (timed: conversion, the importance matrix where the type has one by default,
quantization) and what it records in eval.json: the file's size, its bits per weight (llama.cpp's quantizer says them),
its held-out scores in llama.cpp itself (greedy, the file's own template and stop tokens) and how many answers equal the
trained model's. Each type in --imatrix-both is exported once more with the other gguf_imatrix setting, to show what
the importance matrix buys. --examples scores the first N test rows (the run's eval_max_examples otherwise). Prints a
markdown table; writes bench/results/export-<run name>-<cpu kind>.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402


def exported(folder: Path, gguf_type: str, changes: dict) -> dict:
    run = finetune.open_run(folder, changes)
    path = finetune.export_run(run, gguf_type)
    found = run.summary["exported"][path.name]
    bits = re.match(r"\S+: ([\d.]+) bits per weight", found["notes"][-1]) if found.get("notes") else None
    return {"type": gguf_type, "imatrix": found["imatrix"], "mib": found["mib"], "bits": bits and float(bits[1]),
            "export_s": found["export_seconds"], "exact": found["scores"]["exact_match"],
            "f1": found["scores"]["token_f1"], "same": found["same_answers"], "examples": found["scores"]["examples"],
            "not_stopped": found["not_stopped"], "trained_exact": run.summary["fine_tuned"]["exact_match"],
            "notes": found["notes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--types", nargs="+", default=list(finetune.GGUF_TYPES.__args__))
    parser.add_argument("--imatrix-both", nargs="*", default=["q3_k_m"])
    parser.add_argument("--examples", type=int)
    args = parser.parse_args()
    changes = {"eval_max_examples": args.examples} if args.examples else {}
    rows = []
    for gguf_type in args.types:
        rows.append(exported(args.run, gguf_type, changes))
        if gguf_type in args.imatrix_both:
            rows.append(exported(args.run, gguf_type, {**changes, "gguf_imatrix": not rows[-1]["imatrix"]}))
    print(f"trained model's exact match on the same rows: {rows[0]['trained_exact']:.3f}")
    print("| type | importance matrix | MiB | bits per weight | export s | exact (llama.cpp) | token F1 | "
          "answers as the trained model's |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {'yes' if r['imatrix'] else '-'} | {r['mib']:.1f} | {r['bits'] or '-'} | "
              f"{r['export_s']:.0f} | {r['exact']:.3f} | {r['f1']:.3f} | {r['same']}/{r['examples']} |")
    kind = "-".join(sorted(finetune.cpu_flags() & {"avx2", "avx512_bf16", "amx_bf16"})) or "cpu"
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / f"export-{args.run.resolve().name}-{kind}.json").write_text(json.dumps(rows,
                                                                                                       indent=2))


if __name__ == "__main__":
    main()
