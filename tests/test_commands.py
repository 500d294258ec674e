"""Finished-run commands (eval, generate, merge): each acts on the run with the config it trained with, whatever
./config.yml says, and changes only the keys named on its command line."""

import json
import shutil

import pytest
import torch

import finetune
from conftest import trained_run
from helpers import assert_one_line_error, run_main, write_config, write_jsonl

IDS = torch.tensor([[1, 200, 3000, 4000, 17]])


@pytest.fixture
def elsewhere(tmp_path, monkeypatch, run_copy):
    """A working folder whose config.yml names another model and data, and the run as its output_dir."""
    _, out = run_copy
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    write_config(folder / "config.yml", model_name=str(tmp_path / "some-other-model"),
                 dataset_name=str(tmp_path / "other.jsonl"), output_dir=str(out))
    monkeypatch.chdir(folder)
    return out


def test_commands_use_the_runs_base_model_not_the_working_folders_config(elsewhere, capfd, tiny_model):
    from transformers import AutoConfig

    for command in (["generate", "--prompt", "Request: call mom at 9\nJSON:"], ["eval"], ["merge"]):
        code, out, err = run_main(capfd, *command)
        assert code == 0, err
    assert AutoConfig.from_pretrained(elsewhere / "merged").hidden_size == 64  # the tiny base


def test_a_key_named_on_the_command_changes_that_key_only(run_copy, capfd):
    cfg, out = run_copy
    code, stdout, err = run_main(capfd, "generate", "--model", str(out), "--prompt", "Request: hi\nJSON:",
                                 "eval_max_new_tokens=2")
    assert code == 0, err
    answer = stdout.split("--- fine-tuned\n")[1].strip()
    tokenizer = finetune.load_tokenizer(cfg)
    assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 2
    assert finetune.open_run(out, {"eval_max_new_tokens": 2}).cfg.model_name == cfg.model_name


def test_a_run_answers_prompts_in_the_format_it_trained_with(finished_run, raw_run):
    for (cfg, out), expected in ((finished_run, "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"),
                                 (raw_run, "hello")):
        run = finetune.open_run(out)
        assert run.tokenizer.decode(finetune.prompt_ids(run.tokenizer, "hello", cfg, run.plan)).endswith(expected)


def test_eval_rescores_the_run_and_rewrites_its_eval_json(run_copy, capfd):
    _, out = run_copy
    summary = json.loads((out / "eval.json").read_text())
    planted = {**summary, "fine_tuned": {**summary["fine_tuned"], "exact_match": -1.0}, "base": None}
    (out / "eval.json").write_text(json.dumps(planted))
    code, stdout, err = run_main(capfd, "eval", "--model", str(out))
    assert code == 0, err
    rewritten = json.loads((out / "eval.json").read_text())
    assert rewritten["fine_tuned"] == summary["fine_tuned"] and rewritten["base"] == summary["base"]
    assert rewritten["steps"] == summary["steps"] and "fine-tuned" in stdout


def test_generate_compare_prints_base_and_fine_tuned(finished_run, capfd):
    _, out = finished_run
    code, stdout, err = run_main(capfd, "generate", "--model", str(out), "--prompt", "a", "--prompt", "b", "--compare")
    assert code == 0, err
    assert stdout.count("--- base") == 2 and stdout.count("--- fine-tuned") == 2


def merged_matches_adapter(cfg, out, merged_dir, atol: float):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    with torch.no_grad():
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model_name), out)(IDS).logits
        base = AutoModelForCausalLM.from_pretrained(cfg.model_name)(IDS).logits
        assert not torch.allclose(adapter, base, atol=1e-3)
        assert torch.allclose(merged(IDS).logits, adapter, atol=atol)


def test_merged_model_matches_base_plus_adapter_and_stops_where_the_run_stops(run_copy):
    cfg, out = run_copy
    merged_dir = finetune.merge_run(finetune.open_run(out))
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    merged_matches_adapter(cfg, out, merged_dir, atol=1e-4)
    assert json.loads((merged_dir / "generation_config.json").read_text())["eos_token_id"] == [2]
    assert (merged_dir / "chat_template.jinja").is_file()


def test_a_dora_run_saves_reloads_merges_and_scores_like_lora(make_cfg, tmp_path, capfd):
    from safetensors.torch import load_file

    test_file = write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"Say {i}:", "completion": f" {i}"} for i in range(3)])
    cfg = make_cfg(use_dora=True, learning_rate=5e-2, peft_lora_alpha=64, test_dataset=str(test_file))
    out = finetune.run_training(cfg)
    assert any("lora_magnitude_vector" in name for name in load_file(out / "adapter_model.safetensors"))
    code, _, err = run_main(capfd, "eval", "--model", str(out))
    assert code == 0, err
    merged_matches_adapter(cfg, out, finetune.merge_run(finetune.open_run(out)), atol=1e-4)


def test_qlora_merge_reloads_the_base_in_16_bit(make_cfg):
    from transformers import AutoModelForCausalLM

    out = finetune.run_training(make_cfg(load_in_4bit=True, precision="bf16", max_steps=2, learning_rate=5e-2))
    merged_dir = finetune.merge_run(finetune.open_run(out))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())


def test_a_full_fine_tune_loads_with_transformers_and_needs_no_merge(full_run, tiny_model, capfd):
    from transformers import AutoModelForCausalLM

    _, out = full_run
    tuned, base = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.allclose(tuned(IDS).logits, base(IDS).logits)
    assert_one_line_error(*run_main(capfd, "merge", "--model", str(out)), "already standalone")


@pytest.fixture
def own_base(tmp_path, tiny_model, pc_rows):
    """A finished LoRA run whose base model is a folder of its own, to change after training: (base, run folder)."""
    base = shutil.copytree(tiny_model, tmp_path / "base")
    _, out = trained_run(tmp_path, base, write_jsonl(tmp_path / "train.jsonl", pc_rows[:16]), max_steps=2,
                         eval_strategy="no", validation_split=0)
    return base, out


def change_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


FINISHED_RUN_COMMANDS = [["eval"], ["generate", "--prompt", "Request: call mom at 9\nJSON:"], ["merge"],
                         ["export", "--type", "f16"]]


def test_commands_use_the_plan_the_run_saved_not_one_made_again_from_the_base(own_base, capfd):
    base, out = own_base
    plan, scores = finetune.saved_plan(out), json.loads((out / "eval.json").read_text())["fine_tuned"]
    # Planned again, the changed base would be a raw-prompt model (no chat template), stored in fp16, of an
    # architecture llama.cpp's converter refuses; the run keeps its chat prompts, its dtype and its export.
    (base / "chat_template.jinja").unlink()
    change_config(base, architectures=["OPTForCausalLM"], dtype="float16")
    for command in FINISHED_RUN_COMMANDS:
        code, stdout, err = run_main(capfd, *command, "--model", str(out))
        assert code == 0, (command, err)
    assert json.loads((out / "eval.json").read_text())["fine_tuned"] == scores
    assert json.loads((out / "merged" / "config.json").read_text())["dtype"] == plan.base_dtype == "float32"
    assert (out / "gguf" / "run-f16.gguf").is_file() and finetune.saved_plan(out) == plan


def test_commands_refuse_a_base_that_is_no_longer_the_one_the_run_trained_on(own_base, capfd):
    base, out = own_base
    change_config(base, num_hidden_layers=1)  # transformers would load it, dropping layer 1's weights unsaid
    for command in FINISHED_RUN_COMMANDS:
        assert_one_line_error(*run_main(capfd, *command, "--model", str(out)),
                              rf"model_name {base}: not the base model this run trained on \(layers 2 -> 1")
    assert not (out / "merged").exists() and not (out / "gguf").exists()
