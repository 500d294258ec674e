"""Evaluation: the scores, the stop tokens, greedy answers that do not depend on how scoring is sped up, per-dataset
scores, the curves and the overfitting warning."""

import json

import pytest
import torch

import finetune
from helpers import chat, plan_for, write_jsonl

RECORD = '{"intent": "set_reminder", "task": "call mom", "day": "monday", "time": "09:00"}'


def test_scores_count_exact_answers_tokens_and_json_fields():
    wrong_day = RECORD.replace("monday", "friday")
    scores = finetune.score_answers([" " + RECORD, wrong_day, "not json"], [RECORD, RECORD, RECORD])
    assert scores["exact_match"] == pytest.approx(1 / 3, abs=1e-4)
    assert scores["json_valid"] == pytest.approx(2 / 3, abs=1e-4)
    assert scores["json_field_accuracy"] == pytest.approx((4 + 3 + 0) / 12, abs=1e-4)
    # token F1 by hand: the wrong day shares 8 of 9 whitespace tokens both ways (P = R = 8/9); "not json" shares none
    assert scores["token_f1"] == pytest.approx((1 + 8 / 9 + 0) / 3, abs=1e-4)


def test_free_text_scores_have_no_json_metrics():
    scores = finetune.score_answers(["the cat sat", "a dog"], ["the cat sat", "the dog ran"])
    # "a dog" vs "the dog ran": 1 common token, precision 1/2, recall 1/3, F1 = 2 * (1/6) / (5/6) = 0.4
    assert scores == {"examples": 2, "exact_match": 0.5, "token_f1": pytest.approx((1 + 0.4) / 2, abs=1e-4)}


def test_end_of_turn_of_the_chat_template_is_a_stop_token(tiny_model, tmp_path):
    tokenizer = finetune.load_tokenizer(finetune.Config(model_name=str(tiny_model)))
    assert finetune.end_of_turn_token(tokenizer) == "<|im_end|>"
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|endoftext|>{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>{% endif %}")
    assert finetune.end_of_turn_token(tokenizer) == "<|endoftext|>"
    assert finetune.end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_greedy_answers_are_the_same_adapter_merged_or_not_batched_or_alone(make_cfg):
    from peft import LoraConfig, get_peft_model

    cfg = make_cfg()
    tokenizer = finetune.load_tokenizer(cfg)
    plan = plan_for(cfg, tokenizer)
    torch.manual_seed(0)  # an adapter with random A and B, so that it changes every answer
    model = get_peft_model(finetune.load_base_model(cfg, plan, for_training=False),
                           LoraConfig(target_modules="all-linear", init_lora_weights=False))
    prompts = [finetune.prompt_ids(tokenizer, f"Request: call {name} at {hour}\nJSON:", cfg, plan)
               for name, hour in [("mom", 9), ("the bank", 11), ("Jordan", 7), ("the plumber", 10)]]
    separate = [finetune.generate_answers(model, tokenizer, [p], 12, plan.stop_ids)[0][0] for p in prompts]
    with finetune.adapter_merged(model):
        merged, _ = finetune.generate_answers(model, tokenizer, prompts, 12, plan.stop_ids)
    with model.disable_adapter():
        base, _ = finetune.generate_answers(model, tokenizer, prompts, 12, plan.stop_ids)
    assert merged == separate and len(set(separate)) > 1 and base != separate
    assert all(not getattr(m, "merged", False) for m in model.modules())  # unmerged again afterwards


def test_scoring_leaves_a_16_bit_base_bit_for_bit_as_trained(make_cfg):
    from peft import LoraConfig, get_peft_model

    cfg = make_cfg()
    plan = plan_for(cfg)
    torch.manual_seed(0)
    model = get_peft_model(finetune.load_base_model(cfg, plan, for_training=False).to(torch.bfloat16),
                           LoraConfig(target_modules="all-linear", init_lora_weights=False))
    before = {name: p.clone() for name, p in model.named_parameters()}
    with finetune.adapter_merged(model):
        pass
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_scores_are_given_per_dataset_when_the_test_rows_come_from_several(make_cfg, tmp_path, pc_rows):
    first = write_jsonl(tmp_path / "a.jsonl", pc_rows[:2])
    second = write_jsonl(tmp_path / "b-a-much-longer-dataset-name.jsonl", [
        chat(("user", r["prompt"]), ("assistant", r["completion"])) for r in pc_rows[2:5]])
    cfg = make_cfg(test_dataset=[str(first), str(second)])
    tokenizer = finetune.load_tokenizer(cfg)
    plan = plan_for(cfg, tokenizer)
    pairs = finetune.load_test_pairs(cfg, plan, tokenizer, [])
    model = finetune.load_base_model(cfg, plan, for_training=False)
    scores, samples = finetune.score_generation(model, tokenizer, pairs, cfg, plan, "base model")
    assert scores["examples"] == 5 and {k: v["examples"] for k, v in scores["by_dataset"].items()} == {
        str(first): 2, str(second): 3}
    table = finetune.results_table(scores, scores).splitlines()
    assert [line.split()[0] for line in table if line.split()[0].endswith(":")] == ["a.jsonl:"] * 5 + [
        "b-a-much-longer-dataset-name.jsonl:"] * 5
    assert len({len(line) for line in table}) == 1  # the columns line up, however long a dataset's name
    assert [s["source"] for s in samples] == [str(first), str(second)] * 2 + [str(second)]


def history(train: list[float], val: list[float], every: int = 2) -> list[dict]:
    rows = [{"step": i + 1, "loss": v, "learning_rate": 1e-3} for i, v in enumerate(train)]
    rows += [{"step": (i + 1) * every, "eval_loss": v} for i, v in enumerate(val)]
    return sorted(rows, key=lambda r: r["step"])


def test_overfitting_is_reported_at_the_lowest_validation_loss():
    assert finetune.overfitting_step(history([3, 2.5, 2, 1.5, 1.0, 0.7, 0.5, 0.3], [2.0, 1.6, 1.8, 2.2])) == 4


def test_no_overfitting_warning_while_validation_loss_falls():
    assert finetune.overfitting_step(history([3, 2.5, 2, 1.5, 1.0, 0.7, 0.5, 0.3], [2.0, 1.6, 1.4, 1.3])) is None


def test_curves_are_drawn_as_a_png(tmp_path):
    finetune.plot_curves(history([3, 2, 1, 0.5], [2.0, 1.0]), tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_token_accuracy_is_measured_in_evaluation(finished_run):
    _, out = finished_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["eval_mean_token_accuracy"] for r in rows if "eval_loss" in r]
    assert accuracies and all(0 <= a <= 1 for a in accuracies)
    assert any("tokens_per_second" in r and "grad_norm" in r and "learning_rate" in r for r in rows)
