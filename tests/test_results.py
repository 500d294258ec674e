"""Results a user sees: scores, curves, the overfitting warning, the model card, eval/generate/merge on saved runs,
and the metrics reaching tensorboard and (offline) wandb."""

import json

import pytest
import torch

import finetune
from conftest import write_jsonl

RECORD = '{"intent": "set_reminder", "task": "call mom", "day": "monday", "time": "09:00"}'


def test_scores_count_exact_answers_tokens_and_json_fields():
    wrong_day = RECORD.replace("monday", "friday")
    scores = finetune.score_answers([" " + RECORD, wrong_day, "not json"], [RECORD, RECORD, RECORD])
    assert scores["exact_match"] == pytest.approx(1 / 3, abs=1e-4)
    assert scores["json_valid"] == pytest.approx(2 / 3, abs=1e-4)
    assert scores["json_field_accuracy"] == pytest.approx((4 + 3 + 0) / 12, abs=1e-4)
    assert 1 / 3 < scores["token_f1"] < 1


def test_free_text_scores_have_no_json_metrics():
    scores = finetune.score_answers(["the cat sat", "a dog"], ["the cat sat", "the dog ran"])
    assert scores["exact_match"] == 0.5 and "json_field_accuracy" not in scores
    assert scores["token_f1"] == pytest.approx((1 + finetune.token_f1("a dog", "the dog ran")) / 2, abs=1e-4)


def history(train: list[float], val: list[float], every: int = 2) -> list[dict]:
    rows = [{"step": i + 1, "loss": v, "learning_rate": 1e-3} for i, v in enumerate(train)]
    rows += [{"step": (i + 1) * every, "eval_loss": v} for i, v in enumerate(val)]
    return sorted(rows, key=lambda r: r["step"])


def test_overfitting_is_reported_at_the_lowest_validation_loss():
    assert finetune.overfitting_step(history([3, 2.5, 2, 1.5, 1.0, 0.7, 0.5, 0.3], [2.0, 1.6, 1.8, 2.2])) == 4


def test_no_overfitting_warning_while_validation_loss_falls():
    assert finetune.overfitting_step(history([3, 2.5, 2, 1.5, 1.0, 0.7, 0.5, 0.3], [2.0, 1.6, 1.4, 1.3])) is None


def test_curves_are_a_png(tmp_path):
    finetune.plot_curves(history([3, 2, 1, 0.5], [2.0, 1.0]), tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def finished_run(make_cfg, tmp_path, pc_rows):
    """A short LoRA run of the tiny model with validation, a test file and an adapter big enough to change outputs."""
    test_file = write_jsonl(tmp_path / "test.jsonl", pc_rows[:3])
    cfg = make_cfg(max_steps=4, learning_rate=5e-2, eval_strategy="steps", eval_steps=2, validation_split=0.25,
                   test_dataset=str(test_file), eval_before=True, peft_lora_alpha=64)
    return cfg, finetune.run_training(cfg)


def test_run_writes_curve_card_and_scores(finished_run):
    cfg, final = finished_run
    assert (final / "loss.png").exists() and (final.parent / "loss.png").exists()
    summary = json.loads((final / "eval.json").read_text())
    assert summary["base"]["examples"] == summary["fine_tuned"]["examples"] == 3
    assert summary["data_format"] == "prompt_completion" and len(summary["wrong"]) <= 3
    card = (final / "README.md").read_text()
    assert cfg.model_name in card and "fine-tuned" in card and "loss.png" in card and "exact_match" in card


def test_eval_command_rescores_a_saved_run(finished_run, cli, tmp_path):
    cfg, final = finished_run
    (tmp_path / "run.yml").write_text(json.dumps(cfg.model_dump()))
    before = json.loads((final / "eval.json").read_text())
    result = cli("eval", "--config", str(tmp_path / "run.yml"))
    assert result.returncode == 0, result.stderr
    after = json.loads((final / "eval.json").read_text())
    assert after["fine_tuned"] == before["fine_tuned"] and after["steps"] == before["steps"]
    assert "fine-tuned" in result.stdout


def test_generate_compare_prints_base_and_fine_tuned(finished_run, cli, tmp_path):
    cfg, _ = finished_run
    (tmp_path / "run.yml").write_text(json.dumps(cfg.model_dump()))
    result = cli("generate", "--config", str(tmp_path / "run.yml"), "--prompt", "Request: remind me at 9\nJSON:", "--compare")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- base") == 1 and result.stdout.count("--- fine-tuned") == 1


def test_generate_without_prompts_is_a_user_error(finished_run, cli, tmp_path):
    cfg, _ = finished_run
    (tmp_path / "run.yml").write_text(json.dumps(cfg.model_dump()))
    result = cli("generate", "--config", str(tmp_path / "run.yml"))
    assert result.returncode == 2 and "--prompt" in result.stderr and "Traceback" not in result.stderr


def test_merged_model_matches_base_plus_adapter(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, final = finished_run
    merged_dir = finetune.merge_run(cfg, final)
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    ids = torch.tensor([[1, 200, 3000, 4000, 17]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    with torch.no_grad():
        adapter_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model_name), final)(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(cfg.model_name)(ids).logits
        merged_logits = merged(ids).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)


def test_qlora_merge_reloads_the_base_in_16_bit(make_cfg):
    cfg = make_cfg(load_in_4bit=True, precision="bf16", max_steps=2, learning_rate=5e-2)
    final = finetune.run_training(cfg)
    merged_dir = finetune.merge_run(cfg, final)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.bfloat16
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())


def test_merge_adapter_key_merges_at_the_end_of_training(make_cfg, tmp_path):
    finetune.run_training(make_cfg(merge_adapter=True, max_steps=1))
    assert (tmp_path / "out" / "merged" / "model.safetensors").exists()


def test_metrics_reach_tensorboard(make_cfg, tmp_path):
    finetune.run_training(make_cfg(report_to="tensorboard", max_steps=2))
    assert list((tmp_path / "out").rglob("events.out.tfevents.*"))


def test_metrics_reach_wandb_offline(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    finetune.run_training(make_cfg(report_to="wandb", max_steps=2, run_name="offline-test"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
