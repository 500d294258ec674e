"""recipes/: every recipe is a valid config (for pydantic and for editors' JSON schema), says when to use it, how to run
it and the peak memory --estimate gives for it; the ones that need no Hub download or GPU train 2 steps on the tiny
model, and the 7B QLoRA one fits a 24 GB GPU."""

import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

import finetune
from helpers import ROOT, write_jsonl

RECIPES = sorted((ROOT / "recipes").glob("*.yml"))
# The Hub models the GPU recipes name, as their config.json shapes (the estimate reads nothing else).
HUB_SHAPES = {
    "meta-llama/Llama-2-7b-hf": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "meta-llama/Llama-3.1-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                    tie_word_embeddings=False),
}
NEEDS_GPU = {"llama2-7b-qlora-24gb", "fsdp", "deepspeed-zero3"}
# The SFT runs that preference recipes start from, by their base model: the estimate reads only its config.
SFT_RUNS = {"output/dates-sft": finetune.EMBEDDED_MODEL}


def recipe(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_readme_names_every_recipe_and_only_recipes_that_exist():
    named = set(re.findall(r"recipes/([\w.-]+\.yml)", (ROOT / "README.md").read_text()))
    assert named == {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_a_valid_config_for_the_code_and_for_editors(path):
    finetune.load_config(str(path))
    jsonschema.validate(recipe(path), json.loads((ROOT / "config.schema.json").read_text()))
    assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=../config.schema.json"


@pytest.fixture(scope="module")
def hub_configs(tmp_path_factory):
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("hub-configs")
    for name, shape in HUB_SHAPES.items():
        LlamaConfig(**shape).save_pretrained(folder / name)
    return {name: str(folder / name) for name in HUB_SHAPES}


def stated_and_estimated(path: Path, hub_configs) -> tuple[list[float], list[float]]:
    """(the GiB figures the recipe's opening comment states, the whole-run peaks --estimate gives: per precision on a
    CPU, or on a GPU for a GPU recipe)."""
    comments = [line for line in path.read_text().splitlines()[1:] if line.startswith("#")]
    stated = [float(x) for x in re.findall(r"(\d+\.\d\d) GiB", " ".join(comments))]
    model = recipe(path)["model_name"]
    cfg = finetune.load_config(str(path), [f"model_name={hub_configs.get(model, ROOT / SFT_RUNS.get(model, model))}"])
    model_config = finetune.load_model_config(cfg)
    checkpointing = cfg.gradient_checkpointing is True
    if path.stem in NEEDS_GPU or "device cuda" in " ".join(comments):
        cases = [(cfg.precision if cfg.precision != "auto" else "bf16", "cuda")]
    else:
        cases = [("fp32", "cpu"), ("bf16", "cpu")]
    plans = [dataclasses.replace(finetune.make_plan(cfg, None, model_config, finetune.this_machine(d)), precision=p,
                                 gradient_checkpointing=checkpointing) for p, d in cases]
    return stated, [round(finetune.estimate_phases(cfg, model_config, plan)["whole run"] / 2**30, 2) for plan in plans]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_opens_with_when_how_and_its_estimated_memory(path, hub_configs):
    comments = []
    for line in path.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        comments.append(line)
    assert 2 <= len(comments) <= 4 and re.search(r"(python|torchrun) .*finetune\.py --config recipes/" + path.name,
                                                  " ".join(comments))
    stated, estimated = stated_and_estimated(path, hub_configs)
    assert stated == estimated


def test_the_7b_qlora_recipe_fits_a_24gb_gpu(hub_configs, cli):
    result = cli("--estimate", "24GB", "--device", "cuda", "--config", str(ROOT / "recipes/llama2-7b-qlora-24gb.yml"),
                 f"model_name={hub_configs['meta-llama/Llama-2-7b-hf']}")
    assert result.returncode == 0, result.stderr
    assert "budget 22.35 GiB: the configured run fits" in result.stdout


def small_copy(name: str, folder: Path) -> str:
    """The first 16 rows of a data file the recipe names, in its own file type."""
    source = ROOT / name
    if source.suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(pq.read_table(source).slice(0, 16), folder / source.name)
        return str(folder / source.name)
    return str(write_jsonl(folder / source.name, [json.loads(line) for line in source.read_text().splitlines()[:16]]))


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem not in NEEDS_GPU], ids=lambda p: p.stem)
def test_recipe_previews_and_trains_two_steps_on_the_tiny_model(path, tmp_path, tiny_model, capsys):
    values = recipe(path)
    data = values["dataset_name"]
    values["dataset_name"] = (small_copy(data, tmp_path) if isinstance(data, str) else
                              [{**entry, "name": small_copy(entry["name"], tmp_path)} for entry in data])
    tests = values.get("test_dataset")
    values["test_dataset"] = small_copy(tests, tmp_path) if isinstance(tests, str) else [
        small_copy(name, tmp_path) for name in tests]
    values.update(model_name=str(tiny_model), output_dir=str(tmp_path / "out"), max_steps=2, eval_steps=1,
                  save_steps=1, eval_max_examples=2, eval_max_new_tokens=4, validation_split=0.25, precision="fp32")
    config = tmp_path / "recipe.yml"
    config.write_text(yaml.safe_dump(values))
    finetune.preview_run(finetune.load_config(str(config)), rows=2, colour=False)
    shown = capsys.readouterr().out.split("\n--- dataset ")[1:]
    assert shown and all("[[" in row for row in shown)  # each previewed row shows what it trains
    out = finetune.run_training(finetune.load_config(str(config)))
    assert json.loads((out / "eval.json").read_text())["steps"] == 2
