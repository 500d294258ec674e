"""The saved result: at the root of output_dir as the ecosystem expects (seed 001's snippet loads it), complete or
refused, with a model card, the stop tokens and the chat template the run trained with."""

import ast
import json
import shutil
import subprocess
import sys

import pytest

import finetune
from conftest import tiny_llama
from helpers import ROOT, assert_one_line_error, chat, plan_for, run_main, write_jsonl


def test_the_result_lies_at_the_root_of_output_dir_listed_by_its_marker(finished_run):
    _, out = finished_run
    files = json.loads((out / "result.json").read_text())["files"]
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json", "config.yml", "plan.json", "eval.json", "README.md",
            "metrics.jsonl", "loss.png"} == set(files)
    assert all((out / name).is_file() for name in files)
    assert not (out / "final").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]


SEED_001_SNIPPET = """\
import torch
from transformers import ( AutoModelForCausalLM, AutoTokenizer,
pipeline,
)
from peft import LoraConfig, PeftModel
from trl import SFTTrainer
model_name = {base!r}
new_model = "output"
device_map = {{"": "cpu"}}


base_model = AutoModelForCausalLM.from_pretrained( model_name,
low_cpu_mem_usage=True,
return_dict=True,

torch_dtype=torch.float16,
device_map=device_map,
)

model = PeftModel.from_pretrained(base_model, new_model)
model = model.merge_and_unload()


tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=True)
tokenizer.pad_token = tokenizer.eos_token
tokenizer.padding_side = "right"

prompt = "Who wrote the book Innovator's Dilemma?"

pipe = pipeline(task="text-generation", model=model, tokenizer=tokenizer, max_length=200)
result = pipe(f"<s>[INST] {{prompt}} [/INST]")
print(result[0]['generated_text'])
"""


def test_seed_001_inference_snippet_loads_the_adapter_from_output_dir(finished_run, tmp_path, tiny_model):
    """The snippet as published, with the local base model and the CPU in place of GPU 0."""
    _, out = finished_run
    shutil.copytree(out, tmp_path / "output")
    done = subprocess.run([sys.executable, "-c", SEED_001_SNIPPET.format(base=str(tiny_model))], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Who wrote the book Innovator's Dilemma?" in done.stdout


def test_a_result_cut_off_before_its_marker_is_refused_by_every_reader(run_copy, capfd):
    _, out = run_copy
    (out / "result.json").unlink()
    for command in ("eval", "generate", "merge", "export", "push"):
        code, stdout, err = run_main(capfd, command, "--model", str(out), "--prompt", "hi")
        assert_one_line_error(code, stdout, err, rf"no finished run in {out}")


def test_a_failed_final_save_leaves_the_earlier_result_whole(run_copy, monkeypatch):
    cfg, out = run_copy
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    run = finetune.open_run(out)
    model, tokenizer, plan = finetune.load_finetuned(run), run.tokenizer, run.plan

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenizer, "save_pretrained", disk_full)  # fails after the weights are written aside
    with pytest.raises(OSError):
        finetune.write_final(model, tokenizer, cfg, plan, {"steps": 3})
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_model_card_names_base_data_method_scores_and_how_to_prompt(finished_run, raw_run):
    for (cfg, out), asks in ((finished_run, "apply_chat_template"), (raw_run, "the raw prompt, as in training")):
        card = (out / "README.md").read_text()
        assert f"base_model: {cfg.model_name}" in card and cfg.dataset_name in card and "with LoRA" in card
        assert "exact_match" in card and "loss.png" in card and asks in card


def test_model_card_example_prompts_exactly_as_training_did_system_prompt_included(make_cfg):
    cfg = make_cfg(system_prompt="Reply in JSON.")
    tokenizer = finetune.load_tokenizer(cfg)
    plan = plan_for(cfg, tokenizer)
    card = finetune.model_card(cfg, plan, {"steps": 1})
    example = next(line for line in card.splitlines() if line.startswith("messages = "))
    messages = ast.literal_eval(example.removeprefix("messages = "))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Reply in JSON." in text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == finetune.prompt_ids(tokenizer, "...", cfg, plan)


def test_the_tokenizer_carries_the_chat_template_only_when_the_run_trained_with_it(finished_run, raw_run):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(finished_run[1]).chat_template
    assert AutoTokenizer.from_pretrained(raw_run[1]).chat_template is None
    assert not finetune.saved_plan(raw_run[1]).chat and finetune.saved_plan(finished_run[1]).chat


def test_the_adapter_targets_the_models_own_module_names(finished_run):
    targets = json.loads((finished_run[1] / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def eos_apart_model(tmp_path_factory, embedded_model):
    """A tiny model whose EOS (<|endoftext|>) is not the chat template's end of turn (<|im_end|>)."""
    folder = tiny_llama(tmp_path_factory.mktemp("eos-apart"), embedded_model, eos_token_id=0)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "eos_token": "<|endoftext|>"}))
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 0}))
    return folder


def test_a_chat_trained_model_stops_at_the_end_of_the_turn_in_plain_transformers(eos_apart_model, make_cfg, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "hi.jsonl", [chat(("user", "Say hi"), ("assistant", "Hello there"))] * 16)
    cfg = make_cfg(model_name=str(eos_apart_model), dataset_name=str(data), use_peft=False, max_steps=60,
                   batch_size=8, learning_rate=1e-2, validation_split=0)
    out = finetune.run_training(cfg)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [0, 2]
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    answer = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:]
    assert tokenizer.decode(answer) == "Hello there<|im_end|>"


def test_a_tool_calling_run_saves_a_tokenizer_that_renders_its_prompts_with_the_same_tools(make_cfg, tmp_path):
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in (ROOT / "data" / "demo_tools_train.jsonl").read_text().splitlines()[:8]]
    calls = [{"tools": r["tools"], "messages": r["messages"][:2]} for r in rows]
    cfg = make_cfg(dataset_name=str(write_jsonl(tmp_path / "tools.jsonl", rows)), chat_template="qwen",
                   test_dataset=str(write_jsonl(tmp_path / "test.jsonl", calls[:2])), validation_split=0)
    out = finetune.run_training(cfg)
    saved = AutoTokenizer.from_pretrained(out)
    for row, pair in zip(calls, finetune.load_test_pairs(cfg, plan_for(cfg), finetune.load_tokenizer(cfg), [])):
        text = saved.apply_chat_template(row["messages"][:1], tools=row["tools"], tokenize=False,
                                         add_generation_prompt=True)
        assert saved(text, add_special_tokens=False)["input_ids"] == pair.ids
    assert json.loads((out / "eval.json").read_text())["fine_tuned"]["tool_calls"] == 2
