"""The command line as a user meets it: --help and validation without heavy imports, --schema for editors, --debug
for the traceback behind a one-line error, and library failures that are not dressed up as user mistakes."""

import json
import os
import re
import subprocess
import sys

import pytest

import finetune
from helpers import ROOT, assert_one_line_error, run_main


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
finetune.config_schema()
try:
    finetune.parse_args(["--help"])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "transformers", "datasets", "trl", "peft") if m in sys.modules))
"""


def test_help_schema_and_config_validation_do_not_import_heavy_libraries():
    done = subprocess.run([sys.executable, "-c", LIGHT_IMPORTS], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_schema_prints_the_config_schema(cli):
    result = cli("--schema")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == finetune.config_schema()


@pytest.fixture
def missing_model_config(tmp_path, pc_file):
    path = tmp_path / "c.yml"
    path.write_text(f"model_name: {tmp_path / 'empty-model'}\ndataset_name: {pc_file}\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    (tmp_path / "empty-model").mkdir()
    return str(path)


def test_debug_shows_the_library_error_behind_the_one_line_message(missing_model_config, capfd):
    assert_one_line_error(*run_main(capfd, "--validate", "--config", missing_model_config), "cannot load its")
    code, out, err = run_main(capfd, "--validate", "--config", missing_model_config, "--debug")
    assert code == 2 and "Traceback" in err and "from_pretrained" in err
    assert err.strip().splitlines()[-1].startswith("error:")


def test_a_library_failure_is_not_disguised_as_a_user_mistake(make_cfg, monkeypatch, tmp_path):
    import transformers

    def broken(*args, **kwargs):
        raise RuntimeError("a bug inside the library")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="a bug inside the library"):
        finetune.main(["--validate", "model_name=" + make_cfg().model_name, "dataset_name=x.jsonl",
                       f"output_dir={tmp_path / 'out'}"])


def test_preview_marks_the_trained_tokens_of_each_row_and_reads_no_weights(tmp_path, tiny_model, chat_file, capfd):
    import shutil

    weightless = shutil.copytree(tiny_model, tmp_path / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    code, out, err = run_main(capfd, "preview", "--rows", "2", f"model_name={weightless}", f"dataset_name={chat_file}",
                              "prompt_format=chat", "eval_strategy=no", "validation_split=0", "test_dataset=null",
                              f"output_dir={tmp_path / 'out'}")
    assert code == 0, err
    rows = [json.loads(line) for line in chat_file.read_text().splitlines()[:2]]
    shown = out.split("\n--- dataset ")[1:]
    assert len(shown) == 2 and not (tmp_path / "out").exists()
    for block, row in zip(shown, rows):
        header, text = block.split("\n", 1)
        assert re.fullmatch(rf"{re.escape(str(chat_file))}, row \d+: \d+ tokens, \d+ trained", header)
        assert f"[[{row['messages'][1]['content']}<|im_end|>]]" in text and text.count("[[") == 1
