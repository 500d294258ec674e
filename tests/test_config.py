"""The config schema: what each key means, which values and combinations are refused, and that config.yml documents
exactly the schema. Real YAML files in tmp_path, real libraries; nothing is trained."""

import json
import math
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

import finetune
from conftest import ROOT, numeric_fields, out_of_range_values, write_jsonl

CONFIG_YML = ROOT / "config.yml"


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def user_error(path, overrides=()) -> str:
    with pytest.raises(finetune.UserError) as caught:
        finetune.load_config(path, list(overrides))
    return str(caught.value)


# ---------------------------------------------------------------------------------------------------------------------
# Seed 003: every key is accepted and means what its description says.
# ---------------------------------------------------------------------------------------------------------------------

SEED_003_YAML = """\
model_name: {model}
dataset_name: {data}
dataset_text_field: body
learning_rate: 1.41e-5
batch_size: 4
seq_length: 256
gradient_accumulation_steps: 2
num_train_epochs: 1.5
max_steps: 7
load_in_8bit: true
load_in_4bit: false
logging_steps: 3
save_steps: 5
save_total_limit: 4
use_peft: true
peft_lora_r: 8
peft_lora_alpha: 24
trust_remote_code: true
use_auth_token: true
output_dir: {out}
push_to_hub: true
hub_model_id: someone/tiny-sft
gradient_checkpointing: true
gradient_checkpointing_kwargs: {{use_reentrant: true}}
"""


@pytest.fixture
def seed_003(tmp_path, tiny_model, pc_file) -> tuple[finetune.Config, dict]:
    """(the loaded config, the values as written) for a seed-003 style config.yml with every key off its default."""
    text = SEED_003_YAML.format(model=tiny_model, data=pc_file, out=tmp_path / "run")
    written = yaml.safe_load(text)
    written["learning_rate"] = 1.41e-5  # PyYAML reads 1.41e-5 (no dot) as a string; the schema must still take it
    return finetune.load_config(write_yaml(tmp_path / "seed003.yml", text), []), written


@pytest.mark.parametrize("key", list(yaml.safe_load(SEED_003_YAML.format(model="m", data="d", out="o"))))
def test_seed_003_key_is_read_from_the_file(seed_003, key):
    cfg, written = seed_003
    assert getattr(cfg, key) == written[key]


@pytest.fixture
def seed_003_args(seed_003):
    cfg, _ = seed_003
    return finetune.make_training_args(cfg, "fp32", "cpu", cfg.gradient_checkpointing, False)


@pytest.mark.parametrize("key, argument", [
    ("batch_size", "per_device_train_batch_size"),
    ("learning_rate", "learning_rate"),
    ("gradient_accumulation_steps", "gradient_accumulation_steps"),
    ("num_train_epochs", "num_train_epochs"),
    ("max_steps", "max_steps"),
    ("logging_steps", "logging_steps"),
    ("save_steps", "save_steps"),
    ("save_total_limit", "save_total_limit"),
    ("output_dir", "output_dir"),
    ("gradient_checkpointing", "activation_checkpointing"),  # transformers 5 name; gradient_* is its alias
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
])
def test_training_arguments_carry_the_config_value(seed_003, seed_003_args, key, argument):
    cfg, _ = seed_003
    assert type(seed_003_args).__name__ == "SFTConfig"
    assert getattr(seed_003_args, argument) == getattr(cfg, key)


def test_trainer_never_pushes_checkpoints_itself(seed_003, seed_003_args):
    cfg, _ = seed_003
    assert cfg.push_to_hub and cfg.hub_model_id
    assert seed_003_args.push_to_hub is False


def test_push_comes_after_the_final_save_and_keeps_it_without_a_token(seed_003, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    cfg, _ = seed_003
    final = tmp_path / "run" / "final"
    with pytest.raises(finetune.UserError, match="HF_TOKEN") as caught:
        finetune.push_folder(cfg, final)
    assert str(final) in str(caught.value)


@pytest.mark.parametrize("setting", [True, False])
def test_explicit_gradient_checkpointing_is_obeyed(make_cfg, setting):
    assert finetune.decide_gradient_checkpointing(make_cfg(gradient_checkpointing=setting), "cpu") is setting


def test_auto_gradient_checkpointing_stays_off_when_the_model_fits(make_cfg):
    assert finetune.decide_gradient_checkpointing(make_cfg(gradient_checkpointing="auto"), "cpu") is False


@pytest.mark.parametrize("flags, loads_8bit, loads_4bit", [
    ({"load_in_8bit": True}, True, False),
    ({"load_in_4bit": True}, False, True),
    ({}, None, None),
], ids=["load_in_8bit", "load_in_4bit", "neither"])
def test_quantization_flags_pick_the_bitsandbytes_mode(make_cfg, flags, loads_8bit, loads_4bit):
    quant = finetune.quantization_config(make_cfg(**flags), "fp32")
    if loads_8bit is None:
        assert quant is None
    else:
        assert (quant.load_in_8bit, quant.load_in_4bit) == (loads_8bit, loads_4bit)


def linear_shapes(model, skip) -> dict[str, tuple[int, int]]:
    import torch

    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not skip}


def test_lora_rank_and_alpha_shape_every_linear_layer(make_cfg, tiny_model):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    expected = linear_shapes(plain, skip=plain.get_output_embeddings())
    model = finetune.build_model(make_cfg(use_peft=True, peft_lora_r=4, peft_lora_alpha=12), "fp32", "cpu")
    adapted = {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert set(adapted) == set(expected)
    for name, module in adapted.items():
        assert module.lora_A["default"].weight.shape == (4, expected[name][0])
        assert module.lora_B["default"].weight.shape == (expected[name][1], 4)
        assert module.scaling["default"] == 12 / 4
    trainable, _ = finetune.count_parameters(model)
    assert trainable == sum(4 * (i + o) for i, o in expected.values())


def test_use_peft_false_trains_every_weight(make_cfg):
    model = finetune.build_model(make_cfg(use_peft=False), "fp32", "cpu")
    trainable, total = finetune.count_parameters(model)
    assert trainable == total
    assert not any(hasattr(m, "lora_A") for m in model.modules())


def test_model_name_folder_supplies_the_tokenizer(make_cfg, tiny_model):
    assert Path(finetune.load_tokenizer(make_cfg()).name_or_path) == tiny_model


def test_dataset_name_reads_a_file_or_a_folder_of_files(make_cfg, tmp_path, pc_rows):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", pc_rows[:20])
    write_jsonl(folder / "b.jsonl", pc_rows[20:])
    single = write_jsonl(tmp_path / "one.jsonl", pc_rows[:20])
    for name, count in [(folder, len(pc_rows)), (single, 20)]:
        rows, val = finetune.load_dataset_splits(make_cfg(dataset_name=str(name), validation_split=0))
        assert (len(rows), val) == (count, None)
        assert sorted(rows["prompt"]) == sorted(r["prompt"] for r in pc_rows[:count])


@pytest.fixture
def body_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "body.jsonl", [{"body": f"Plain text example number {i}."} for i in range(12)])


def test_dataset_text_field_names_the_column_that_is_trained(make_cfg, body_file):
    cfg = make_cfg(dataset_name=str(body_file), dataset_text_field="body", validation_split=0)
    tokenizer = finetune.load_tokenizer(cfg)
    rows, _ = finetune.load_dataset_splits(cfg)
    tokenized, _ = finetune.tokenize_dataset(rows, tokenizer, cfg, cfg.dataset_name)
    expected = [tokenizer(row["body"])["input_ids"] + [tokenizer.eos_token_id] for row in rows]
    assert list(tokenized["input_ids"]) == expected


def test_rows_without_the_text_field_are_refused_naming_their_fields(make_cfg, body_file):
    with pytest.raises(finetune.UserError, match="'body'"):
        finetune.load_dataset_splits(make_cfg(dataset_name=str(body_file), validation_split=0))


REMOTE_CODE = """\
import os
from transformers import LlamaConfig

open(os.environ["REMOTE_CODE_MARKER"], "a").write("ran\\n")


class MarkedLlamaConfig(LlamaConfig):
    model_type = "marked-llama"
"""

TRY_REMOTE_CODE = """\
import json, os, sys
import finetune
results = {}
for trust in (False, True):
    cfg = finetune.Config(model_name=sys.argv[1], trust_remote_code=trust)
    try:
        finetune.load_model_config(cfg)
        outcome = "loaded"
    except finetune.UserError as e:
        outcome = "error: " + str(e)
    results[str(trust)] = [outcome, os.path.exists(os.environ["REMOTE_CODE_MARKER"])]
print(json.dumps(results))
"""


def test_trust_remote_code_decides_whether_model_code_runs(tmp_path, tiny_model):
    model = tmp_path / "remote-model"
    model.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    config.update(model_type="marked-llama", auto_map={"AutoConfig": "marked.MarkedLlamaConfig"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "marked.py").write_text(REMOTE_CODE)
    marker = tmp_path / "code-ran"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "REMOTE_CODE_MARKER": str(marker), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", TRY_REMOTE_CODE, str(model)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    (refused, ran_untrusted), (loaded, ran_trusted) = results["False"], results["True"]
    assert refused.startswith("error: model_name") and not ran_untrusted
    assert loaded == "loaded" and ran_trusted


@pytest.mark.parametrize("use_auth_token", [True, False])
def test_use_auth_token_decides_whether_hf_token_is_sent(make_cfg, monkeypatch, use_auth_token):
    from huggingface_hub.utils import build_hf_headers

    monkeypatch.setenv("HF_TOKEN", "hf_notarealtokenbutwellformed0123456")
    headers = build_hf_headers(token=finetune.hub_token(make_cfg(use_auth_token=use_auth_token)))
    assert ("authorization" in {k.lower() for k in headers}) is use_auth_token


# ---------------------------------------------------------------------------------------------------------------------
# Unknown keys, wrong types and ranges, contradictions.
# ---------------------------------------------------------------------------------------------------------------------

def test_unknown_key_in_file_names_file_key_and_closest_key(tmp_path):
    path = write_yaml(tmp_path / "typo.yml", "batch_size: 4\nlerning_rate: 0.001\n")
    message = user_error(path)
    assert path in message and "'lerning_rate'" in message and "did you mean 'learning_rate'?" in message


def test_unknown_key_on_command_line_names_key_and_closest_key(tmp_path):
    message = user_error(write_yaml(tmp_path / "ok.yml", "batch_size: 4\n"), ["lerning_rate=0.001"])
    assert "command line" in message and "'lerning_rate'" in message and "did you mean 'learning_rate'?" in message




def bad_numeric_values():
    for name, field in numeric_fields().items():
        yield pytest.param(name, "abc", id=f"{name}=abc")
        yield pytest.param(name, True, id=f"{name}=true")
        if float in typing.get_args(field.annotation) or field.annotation is float:
            yield pytest.param(name, math.nan, id=f"{name}=nan")
        for value in out_of_range_values(field):
            yield pytest.param(name, value, id=f"{name}={value}")


def test_schema_has_numeric_keys_with_bounds():
    fields = numeric_fields()
    assert {"batch_size", "learning_rate", "eval_steps", "save_total_limit"} <= set(fields)
    assert "gradient_checkpointing" not in fields and "peft_target_modules" not in fields
    assert all(out_of_range_values(fields[k]) for k in ("batch_size", "learning_rate", "validation_split"))


@pytest.mark.parametrize("key, value", list(bad_numeric_values()))
def test_numeric_key_with_wrong_type_or_range_is_refused_by_name(tmp_path, key, value):
    path = write_yaml(tmp_path / "bad.yml", yaml.safe_dump({key: value}))
    message = user_error(path)
    assert path in message and f"{key}:" in message


def test_infinite_epochs_are_refused(tmp_path):
    message = user_error(write_yaml(tmp_path / "inf.yml", "num_train_epochs: .inf\n"))
    assert "num_train_epochs" in message


CONTRADICTIONS = [
    ({"load_in_4bit": True, "load_in_8bit": True}, ["load_in_4bit", "load_in_8bit"]),
    ({"load_in_4bit": True, "use_peft": False}, ["load_in_4bit", "use_peft"]),
    ({"load_in_8bit": True, "use_peft": False}, ["load_in_8bit", "use_peft"]),
    ({"num_train_epochs": 0, "max_steps": -1}, ["num_train_epochs", "max_steps"]),
    ({"push_to_hub": True}, ["push_to_hub", "hub_model_id"]),
    ({"eval_strategy": "steps", "validation_split": 0}, ["eval_strategy", "validation_split"]),
    ({"eval_strategy": "epoch", "validation_split": 0}, ["eval_strategy", "validation_split"]),
    ({"resume_from_checkpoint": "auto", "overwrite_output_dir": True}, ["resume_from_checkpoint", "overwrite_output_dir"]),
]


@pytest.mark.parametrize("values, keys", CONTRADICTIONS,
                         ids=["+".join(f"{k}={v}" for k, v in values.items()) for values, _ in CONTRADICTIONS])
def test_contradiction_is_refused_naming_both_sides(tmp_path, values, keys):
    path = write_yaml(tmp_path / "contradiction.yml", yaml.safe_dump(values))
    message = user_error(path)
    assert path in message and all(key in message for key in keys)


# ---------------------------------------------------------------------------------------------------------------------
# Files that are not a config: broken YAML, wrong shape, missing, not UTF-8.
# ---------------------------------------------------------------------------------------------------------------------

def test_broken_yaml_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path / "broken.yml", "batch_size: 4\nseed: 1\n\tlearning_rate: 0.1\nmax_steps: 3\n")
    message = user_error(path)
    assert path in message and re.search(r"\bline 3\b", message)


@pytest.mark.parametrize("text", ["- batch_size: 4\n- seed: 1\n", "just some words\n", "42\n"],
                         ids=["list", "string", "number"])
def test_yaml_that_is_not_a_mapping_is_refused(tmp_path, text):
    path = write_yaml(tmp_path / "shape.yml", text)
    message = user_error(path)
    assert path in message and "must be a mapping" in message


def test_missing_config_file_names_the_path(tmp_path):
    path = str(tmp_path / "nowhere" / "config.yml")
    assert path in user_error(path)


def test_non_utf8_config_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "latin1.yml"
    path.write_bytes("run_name: café\n".encode("latin-1"))
    message = user_error(str(path))
    assert str(path) in message and "UTF-8" in message


# ---------------------------------------------------------------------------------------------------------------------
# Command-line overrides.
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key, value", [
    ("batch_size=4", "batch_size", 4),
    ("peft_target_modules=[q_proj,v_proj]", "peft_target_modules", ["q_proj", "v_proj"]),
    ("learning_rate=5e-5", "learning_rate", 5e-5),
    ("eval_steps=null", "eval_steps", None),
    ("eval_strategy=no", "eval_strategy", "no"),
])
def test_override_value_is_read_as_yaml(tmp_path, override, key, value):
    cfg = finetune.load_config(write_yaml(tmp_path / "c.yml", "eval_steps: 7\n"), [override])
    assert getattr(cfg, key) == value and type(getattr(cfg, key)) is type(value)


def test_override_wins_over_the_file(tmp_path):
    assert finetune.load_config(write_yaml(tmp_path / "c.yml", "batch_size: 16\n"), ["batch_size=2"]).batch_size == 2


def test_override_with_wrong_type_names_the_key(tmp_path):
    assert "batch_size" in user_error(write_yaml(tmp_path / "c.yml", "seed: 1\n"), ["batch_size=abc"])


def test_bare_word_override_explains_key_value(tmp_path):
    message = user_error(write_yaml(tmp_path / "c.yml", "seed: 1\n"), ["foo"])
    assert "'foo'" in message and "key=value" in message


@pytest.mark.parametrize("key", ["eval_strategy", "save_strategy"])
def test_yaml_bare_no_means_no(tmp_path, key):
    cfg = finetune.load_config(write_yaml(tmp_path / "c.yml", f"{key}: no\n"), [])
    assert getattr(cfg, key) == "no"


# ---------------------------------------------------------------------------------------------------------------------
# config.yml documents the schema: same keys, same order, the description as the comment above each key.
# ---------------------------------------------------------------------------------------------------------------------

def config_yml_keys() -> list[tuple[int, str]]:
    """(line index, key) of each top-level key in config.yml."""
    lines = CONFIG_YML.read_text(encoding="utf-8").splitlines()
    return [(i, m.group(1)) for i, line in enumerate(lines) if (m := re.match(r"([A-Za-z_]\w*)\s*:", line))]


def test_config_yml_has_exactly_the_schema_keys_in_order():
    assert [key for _, key in config_yml_keys()] == list(finetune.Config.model_fields)
    assert list(yaml.safe_load(CONFIG_YML.read_text(encoding="utf-8"))) == list(finetune.Config.model_fields)


def test_config_yml_comment_above_each_key_is_its_description():
    lines = CONFIG_YML.read_text(encoding="utf-8").splitlines()
    for index, key in config_yml_keys():
        assert lines[index - 1] == "# " + finetune.Config.model_fields[key].description, key


def test_config_yml_is_a_valid_config():
    assert isinstance(finetune.load_config(str(CONFIG_YML), []), finetune.Config)


@pytest.mark.parametrize("key", list(finetune.Config.model_fields))
def test_schema_field_has_description_and_default(key):
    field = finetune.Config.model_fields[key]
    assert field.description and field.description.strip()
    assert not field.is_required()
