"""The shipped default job (`python finetune.py` with config.yml) under each memory allocator, against TRL's training
peak measured in the same run.

    .venv/bin/python bench/bench_allocator.py [--rounds 2] [--json OUT]

Allocators, each run alternately `--rounds` times in a fresh folder holding config.yml, data/ and models/:
- tunables: what finetune.py gives a training run (FAST_ALLOCATOR's glibc settings; each phase hands free heap pages
  back to the system at its end);
- glibc: plain glibc (FINETUNE_NO_REEXEC=1);
- jemalloc, tcmalloc: Debian's libjemalloc2 / libtcmalloc-minimal4 through LD_PRELOAD, skipped where not installed.
Per run: wall time of the whole job, its peak resident memory (the largest phase peak in eval.json) and exact match.
The baseline is bench_speed.py's TRL trainer (bf16 where the CPU has bf16 units, else fp32) training the same model:
its peak resident memory. Medians over rounds; only same-run ratios compare across machines. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_speed
from bench_speed import ROOT

LIBRARIES = Path("/usr/lib/x86_64-linux-gnu")
ALLOCATORS = {"tunables": {}, "glibc": {"FINETUNE_NO_REEXEC": "1"},
              "jemalloc": {"FINETUNE_NO_REEXEC": "1", "LD_PRELOAD": str(LIBRARIES / "libjemalloc.so.2")},
              "tcmalloc": {"FINETUNE_NO_REEXEC": "1", "LD_PRELOAD": str(LIBRARIES / "libtcmalloc_minimal.so.4")}}


def default_job(env: dict[str, str]) -> dict:
    """One run of the shipped config in a fresh folder: {wall_s, peak_gib, exact_match}."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copy(ROOT / "config.yml", folder)
        shutil.copytree(ROOT / "data", folder / "data")
        (folder / "models").symlink_to(ROOT / "models")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / "finetune.py")], cwd=folder, capture_output=True, text=True,
                              env={**bench_speed.child_env(), **env})
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"default job failed ({done.returncode}):\n{done.stderr[-3000:]}")
        summary = json.loads((folder / "output" / "eval.json").read_text())
    return {"wall_s": wall, "peak_gib": summary["memory"]["peak_bytes"] / 2**30,
            "exact_match": summary["fine_tuned"]["exact_match"]}


def trl_training_peak(rounds: int) -> tuple[str, float]:
    """(which TRL setting, its median peak in GiB) at bench_speed.py's default settings."""
    kind = "trl-bf16" if {"avx512_bf16", "amx_bf16"} & bench_speed.finetune.cpu_flags() else "trl-fp32"
    args = bench_speed.parse_args([])
    with tempfile.TemporaryDirectory() as tmp:
        bench_speed.write_dataset(Path(tmp))
        peaks = [bench_speed.run_one(kind, Path(tmp), args)["peak_mib"] / 1024 for _ in range(rounds)]
    return kind, statistics.median(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args()
    kinds = [k for k, env in ALLOCATORS.items() if "LD_PRELOAD" not in env or Path(env["LD_PRELOAD"]).exists()]
    print(f"CPU: {bench_speed.cpu_kind()['kind']}")
    runs = {k: [] for k in kinds}
    for round_ in range(1, args.rounds + 1):
        for kind in kinds:
            runs[kind].append(default_job(ALLOCATORS[kind]))
            print(f"round {round_} {kind:<9} " + "  ".join(f"{k} {v:.3f}" for k, v in runs[kind][-1].items()),
                  flush=True)
    trl, trl_peak = trl_training_peak(args.rounds)
    medians = {k: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for k, rs in runs.items()}
    print(f"\n{'allocator':<10}{'wall s':>8}{'peak GiB':>10}{'/ ' + trl + ' peak':>20}{'exact':>7}")
    for kind, m in medians.items():
        print(f"{kind:<10}{m['wall_s']:>8.1f}{m['peak_gib']:>10.2f}{m['peak_gib'] / trl_peak:>20.2f}"
              f"{m['exact_match']:>7.3f}")
    print(f"{trl + ' training':<18}{trl_peak:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": bench_speed.cpu_kind()["kind"], "runs": runs, "medians": medians,
                                               "baseline": {trl: trl_peak}}, indent=2))


if __name__ == "__main__":
    main()
