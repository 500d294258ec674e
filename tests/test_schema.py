"""The schema: config files and key=value overrides are read as written, dataset lists become entries, and
config.yml, --help and config.schema.json all document exactly the schema. Refusals of bad configs are in
test_bad_inputs.py."""

import json
import re

import jsonschema
import pytest
import yaml

import finetune
from helpers import ROOT, write_config

CONFIG_YML = ROOT / "config.yml"
SCHEMA_JSON = ROOT / "config.schema.json"

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
def seed_003(tmp_path):
    """(the loaded config, the values as written) for a config.yml with every key users know set off its default."""
    text = SEED_003_YAML.format(model="some/model", data="some/dataset", out=tmp_path / "run")
    path = tmp_path / "seed003.yml"
    path.write_text(text)
    written = yaml.safe_load(text)
    written["learning_rate"] = 1.41e-5  # PyYAML reads 1.41e-5 (no dot) as a string; the schema must still take it
    return finetune.load_config(str(path)), written


@pytest.mark.parametrize("key", list(yaml.safe_load(SEED_003_YAML.format(model="m", data="d", out="o"))))
def test_every_key_users_know_is_read_from_the_file(seed_003, key):
    cfg, written = seed_003
    assert getattr(cfg, key) == written[key]


@pytest.mark.parametrize("override, key, value", [
    ("batch_size=4", "batch_size", 4),
    ("peft_target_modules=[q_proj,v_proj]", "peft_target_modules", ["q_proj", "v_proj"]),
    ("learning_rate=5e-5", "learning_rate", 5e-5),
    ("eval_steps=null", "eval_steps", None),
    ("eval_strategy=no", "eval_strategy", "no"),
    ("system_prompt=Answer in JSON.", "system_prompt", "Answer in JSON."),
])
def test_override_value_is_read_as_yaml(tmp_path, override, key, value):
    cfg = finetune.load_config(write_config(tmp_path / "c.yml", eval_steps=7), [override])
    assert getattr(cfg, key) == value and type(getattr(cfg, key)) is type(value)


def test_override_wins_over_the_file(tmp_path):
    assert finetune.load_config(write_config(tmp_path / "c.yml", batch_size=16), ["batch_size=2"]).batch_size == 2


@pytest.mark.parametrize("key", ["eval_strategy", "save_strategy"])
def test_yaml_bare_no_means_no(tmp_path, key):
    path = tmp_path / "c.yml"
    path.write_text(f"{key}: no\n")
    assert getattr(finetune.load_config(str(path)), key) == "no"


def test_dataset_list_entries_take_their_own_fields_and_the_top_level_ones_otherwise(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("dataset_name:\n  - {name: a.jsonl, weight: 1}\n"
                    "  - {name: b.jsonl, weight: 3, prompt_field: question}\ncompletion_field: answer\n")
    cfg = finetune.load_config(str(path))
    first, second = finetune.dataset_entries(cfg.dataset_name, cfg)
    assert (first.name, first.weight, first.prompt_field, first.completion_field) == ("a.jsonl", 1.0, "prompt",
                                                                                      "answer")
    assert (second.name, second.weight, second.prompt_field, second.completion_field) == ("b.jsonl", 3.0, "question",
                                                                                        "answer")
    assert (first.split, second.split) == ("train", "train")


def test_test_dataset_entries_read_the_test_split_of_the_hub():
    cfg = finetune.Config(test_dataset="someone/qa")
    (entry,) = finetune.dataset_entries(cfg.test_dataset, cfg, test=True)
    assert entry.split == "test"


# ---------------------------------------------------------------------------------------------------------------------
# The schema documented: config.yml, --help, config.schema.json; in the user's words.
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


@pytest.mark.parametrize("key", list(finetune.Config.model_fields))
def test_every_key_has_a_default_and_a_description_in_the_users_words(key):
    field = finetune.Config.model_fields[key]
    assert not field.is_required()
    assert field.description and not re.search(r"\bseed\s*0\d\d\b", field.description, re.I)


def test_config_schema_json_is_the_schema_of_the_code():
    assert json.loads(SCHEMA_JSON.read_text()) == finetune.config_schema()


def test_config_yml_validates_against_the_json_schema_and_names_it_for_editors():
    text = CONFIG_YML.read_text()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=config.schema.json"
    jsonschema.validate(yaml.safe_load(text), json.loads(SCHEMA_JSON.read_text()))


def test_json_schema_catches_what_an_editor_should_flag():
    schema = json.loads(SCHEMA_JSON.read_text())
    for bad in ({"lerning_rate": 1e-4}, {"batch_size": 0}, {"precision": "fp64"},
                {"dataset_name": [{"name": "a.jsonl", "wieght": 2}]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_defaults_point_at_no_demo_file():
    demo = {str(p.relative_to(ROOT)) for p in (ROOT / "data").iterdir()}
    defaults = {field.default for field in finetune.Config.model_fields.values() if isinstance(field.default, str)}
    assert not demo & defaults and finetune.Config().dataset_name is None and finetune.Config().test_dataset is None
