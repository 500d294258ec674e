"""Helpers shared by the tests: files on disk, the CLI in a subprocess, and the user-error contract."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import annotated_types
import yaml

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "bench"):  # finetune.py, and the benchmarks whose measurements tests share
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import finetune  # noqa: E402

EMBEDDED = ROOT / finetune.EMBEDDED_MODEL
DEMO_TRAIN = ROOT / "data" / "demo_train.jsonl"
DEMO_TEST = ROOT / "data" / "demo_test.jsonl"
# A training run that only has to get through: one step, nothing scored, nothing evaluated or saved on the way.
# Settings of a fast run of the tiny model: a few steps, no evaluation, checkpoint or scoring unless a test asks.
FAST = dict(max_steps=4, batch_size=4, logging_steps=1, eval_strategy="no", save_strategy="no", eval_before=False,
            learning_rate=1e-3, eval_max_new_tokens=8, precision="fp32", test_dataset=None)
ONE_STEP = dict(FAST, max_steps=1, validation_split=0)


def plan_for(cfg: finetune.Config, tokenizer=None) -> finetune.Plan:
    """The plan a run of cfg makes on this machine (with cfg's own tokenizer unless one is given)."""
    formats = [source.format for source in finetune.load_sources(cfg)] if cfg.dataset_name else []
    return finetune.make_plan(cfg, tokenizer or finetune.load_tokenizer(cfg), finetune.load_model_config(cfg),
                              finetune.this_machine(), formats)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, **values) -> str:
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return str(path)


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """python finetune.py ARGS in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


PROGRESS_BAR = re.compile(r"^.*\d+%\|.*\|")  # tqdm ("Loading weights:  50%|#####     | 10/20"), redrawn in place


def message_lines(err: str) -> list[str]:
    """What stderr says, without blank lines and progress bars (a terminal redraws those; they are no message)."""
    return [line for line in err.splitlines() if line.strip() and not PROGRESS_BAR.match(line)]


def assert_one_line_error(code: int, out: str, err: str, culprit: str = "") -> str:
    """The user-error contract: exit status 2, no traceback, stderr one line starting with 'error:' that matches
    the culprit regex. Returns the line."""
    assert "Traceback" not in out + err, err
    lines = message_lines(err)
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert re.search(culprit, lines[0]), f"{culprit!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(folder: Path, ignored=frozenset({".lock"})) -> dict[str, str]:
    """Every file and folder under `folder`: relative path -> sha256 (folders -> 'dir')."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.name not in ignored}


def numeric_fields() -> dict[str, typing.Any]:
    """Schema fields whose type is int or float (optionally None), read from Config."""
    found = {}
    for name, field in finetune.Config.model_fields.items():
        types = set(typing.get_args(field.annotation) or [field.annotation]) - {type(None)}
        if types and types <= {int, float}:
            found[name] = field
    return found


def out_of_range_values(field) -> list:
    """One value past each bound the schema declares for the field."""
    values = []
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            values.append(bound.ge - 1)
        elif isinstance(bound, annotated_types.Gt):
            values.append(bound.gt)
        elif isinstance(bound, annotated_types.Le):
            values.append(bound.le + 1)
        elif isinstance(bound, annotated_types.Lt):
            values.append(bound.lt)
    return values


def offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE=1 for an in-process run: the libraries read the variable once at import, so set their copy too."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def log_to_current_stderr() -> None:
    """Libraries' log handlers hold the sys.stderr of the test that created them (closed since, under capture); point
    them at this test's stderr, as a fresh process would, so that what they log is seen and judged here."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # not setStream: it flushes the old, closed stream


def run_main(capfd, *argv: str) -> tuple[int, str, str]:
    """finetune.main(argv) in this process: (exit code, stdout, stderr)."""
    log_to_current_stderr()
    capfd.readouterr()
    try:
        code = finetune.main(list(argv))
    except SystemExit as e:  # argparse's --help exits
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def logged(folder: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def chat(*turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}
