"""python finetune.py as a user runs it (a subprocess): --help, one-line user errors, --validate, output_dir safety.
Only the output_dir tests train (one step of the tiny model)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import finetune
from conftest import ROOT, run_cli, write_jsonl


def write_config(path: Path, **values) -> str:
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return str(path)


@pytest.fixture
def tiny_config(tmp_path, tiny_model, pc_file) -> str:
    """A config file in tmp_path for the tiny model on the 48 demo rows; nothing lands in the repository."""
    return write_config(tmp_path / "config.yml", model_name=str(tiny_model), dataset_name=str(pc_file),
                        test_dataset=None, output_dir=str(tmp_path / "out"), precision="fp32")


def one_line_user_error(result: subprocess.CompletedProcess) -> str:
    """The user-error contract: exit status 2, no traceback, stderr exactly one line starting with 'error:'."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# --help and light imports
# ---------------------------------------------------------------------------------------------------------------------

def test_help_lists_every_key_with_its_description(cli):
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, field in finetune.Config.model_fields.items():
        assert any(re.match(rf"\s+{name}\b", line) and field.description in line for line in lines), name


LIGHT_IMPORTS = """\
import sys
import finetune
finetune.load_config("config.yml", ["batch_size=2"])
finetune.parse_args(["batch_size=2"])
try:
    finetune.parse_args(["--help"])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "transformers", "datasets", "trl", "peft") if m in sys.modules))
"""


def test_help_and_config_validation_do_not_import_heavy_libraries():
    done = subprocess.run([sys.executable, "-c", LIGHT_IMPORTS], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------------------------------------------------
# User errors: exit 2, one line on stderr naming the culprit, no traceback.
# ---------------------------------------------------------------------------------------------------------------------

def unknown_key_in_file(tmp_path, config):
    path = write_config(tmp_path / "typo.yml", **yaml.safe_load(Path(config).read_text()), lerning_rate=0.001)
    return ["--validate", "--config", path], [path, "'lerning_rate'", "'learning_rate'"]


def bad_override_type(tmp_path, config):
    return ["--validate", "--config", config, "batch_size=abc"], ["batch_size"]


def bare_word(tmp_path, config):
    return ["--validate", "--config", config, "foo"], ["'foo'", "key=value"]


def missing_config_file(tmp_path, config):
    path = str(tmp_path / "missing.yml")
    return ["--validate", "--config", path], [path]


def missing_dataset_file(tmp_path, config):
    path = str(tmp_path / "no-such-data.jsonl")
    return ["--validate", "--config", config, f"dataset_name={path}"], [path]


def broken_jsonl_line(tmp_path, config):
    lines = Path(yaml.safe_load(Path(config).read_text())["dataset_name"]).read_text().splitlines()
    lines[6] = '{"prompt": "half a row", "completion": '
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return ["--validate", "--config", config, f"dataset_name={path}"], [f"{path}:7"]


def rows_without_expected_fields(tmp_path, config):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)])
    return ["--validate", "--config", config, f"dataset_name={path}"], [str(path), "'answer'", "'question'"]


def missing_model_folder(tmp_path, config):
    path = str(tmp_path / "no-such-model")
    return ["--validate", "--config", config, f"model_name={path}"], [path]


@pytest.mark.parametrize("case", [unknown_key_in_file, bad_override_type, bare_word, missing_config_file,
                                  missing_dataset_file, broken_jsonl_line, rows_without_expected_fields,
                                  missing_model_folder], ids=lambda case: case.__name__)
def test_user_error_is_one_line_naming_the_culprit(cli, tmp_path, tiny_config, case):
    args, culprits = case(tmp_path, tiny_config)
    line = one_line_user_error(cli(*args))
    assert all(c in line for c in culprits), line


# ---------------------------------------------------------------------------------------------------------------------
# --validate: rows, token lengths and long examples, without training.
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def token_lengths(tiny_model, pc_rows) -> list[int]:
    """Tokens per demo row as the model sees it: prompt + completion + one EOS, with the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return sorted(len(tokenizer(r["prompt"])["input_ids"])
                  + len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in pc_rows)


def validate_report(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    rows = re.search(r"(\d+) train \+ (\d+) validation", result.stdout)
    summary = re.search(r"min (\d+), median (\d+), max (\d+); (\d+) longer than seq_length=(\d+)", result.stdout)
    assert rows and summary, result.stdout
    train, validation = map(int, rows.groups())
    low, median, high, long, seq_length = map(int, summary.groups())
    return dict(train=train, validation=validation, min=low, median=median, max=high, long=long, seq_length=seq_length)


def test_validate_reports_the_split_and_long_examples(cli, tiny_config, token_lengths):
    assert len(token_lengths) == 48 and min(token_lengths) > 40  # so every training row is longer than 40
    report = validate_report(cli("--validate", "--config", tiny_config, "validation_split=0.25", "seq_length=40"))
    assert (report["train"], report["validation"]) == (36, 12)
    assert (report["long"], report["seq_length"]) == (36, 40)


def test_validate_token_summary_describes_the_examples(cli, tiny_config, token_lengths):
    seq_length = token_lengths[len(token_lengths) * 3 // 4]
    report = validate_report(cli("--validate", "--config", tiny_config, "validation_split=0", "eval_strategy=no",
                                 f"seq_length={seq_length}"))
    assert (report["train"], report["validation"]) == (48, 0)
    assert report["long"] == sum(n > seq_length for n in token_lengths) > 0
    assert (report["min"], report["max"]) == (token_lengths[0], token_lengths[-1])
    assert token_lengths[23] <= report["median"] <= token_lengths[24]


# ---------------------------------------------------------------------------------------------------------------------
# output_dir: a folder holding anything is not overwritten unless asked.
# ---------------------------------------------------------------------------------------------------------------------

ONE_STEP = ["max_steps=1", "precision=fp32", "eval_strategy=no", "save_strategy=no", "eval_before=false",
            "test_dataset=null", "validation_split=0"]


@pytest.fixture(scope="module")
def refused_run(tmp_path_factory, tiny_model, pc_rows):
    """One training run pointed at an output_dir that already holds a file: (result, output_dir, the file)."""
    tmp = tmp_path_factory.mktemp("used-output")
    data = write_jsonl(tmp / "train.jsonl", pc_rows)
    out = tmp / "out"
    out.mkdir()
    (out / "notes.txt").write_text("results of an earlier run\n")
    config = write_config(tmp / "config.yml", model_name=str(tiny_model), dataset_name=str(data), output_dir=str(out))
    return run_cli("--config", config, *ONE_STEP), out, out / "notes.txt"


def test_used_output_dir_is_refused_and_left_alone(refused_run):
    result, out, notes = refused_run
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: output_dir {out}")
    assert notes.read_text() == "results of an earlier run\n"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_used_output_dir_refusal_is_a_one_line_error(refused_run):
    result, out, _ = refused_run
    assert str(out) in one_line_user_error(result)


def test_overwrite_output_dir_replaces_the_earlier_run(cli, tmp_path, tiny_config):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("results of an earlier run\n")
    result = cli("--config", tiny_config, *ONE_STEP, "overwrite_output_dir=true")
    assert result.returncode == 0, result.stderr
    assert (out / "final" / "adapter_config.json").is_file()
    assert not (out / "notes.txt").exists()
