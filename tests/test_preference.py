"""The preference stages (stage: dpo, kto), section by section: rows in TRL's shapes rendered and tokenized as
supervised rows are, the log-probabilities of packed sequences, the loss against the reference equal to DPO's and KTO's
formulas computed by hand, scores before and after, and a DPO run that starts from an SFT run's folder, then merges,
exports and is scored again by `eval`. Bad preference rows are in the bad-input corpus."""

import json
import math
import shutil

import pytest
import torch

import finetune
from helpers import DEMO_TEST, FAST, logged, run_main, write_jsonl

PROMPT = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]
CHOSEN, REJECTED = {"role": "assistant", "content": "Paris"}, {"role": "assistant", "content": "Lyon"}


def pair_rows(n: int = 16) -> list[dict]:
    return [{"prompt": f"Say the number after {i}.", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(n)]


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows())


def tokenized(cfg: finetune.Config) -> list[dict]:
    """The training examples of a config's data, as preference_batch makes them (before any cut or drop)."""
    tokenizer = finetune.load_tokenizer(cfg)
    sources = finetune.load_sources(cfg)
    plan = finetune.make_plan(cfg, tokenizer, finetune.load_model_config(cfg), finetune.this_machine(),
                              [s.format for s in sources])
    rows = sources[0].train
    out = finetune.preference_batch(rows[:], tokenizer, sources[0], cfg, plan)
    return [dict(zip(out, values)) for values in zip(*out.values())], tokenizer


def trained_text(tokenizer, ids, weights) -> str:
    return tokenizer.decode([i for i, w in zip(ids, weights) if w == 1])


# --- data --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row", [
    {"prompt": PROMPT, "chosen": [CHOSEN], "rejected": [REJECTED]},  # conversational, explicit prompt
    {"chosen": [*PROMPT, CHOSEN], "rejected": [*PROMPT, REJECTED]},  # conversational, implicit prompt
    {"prompt": PROMPT[1:], "system": PROMPT[0]["content"], "chosen": "Paris", "rejected": "Lyon"},  # system column
], ids=["explicit-prompt", "implicit-prompt", "system-column"])
def test_every_pair_shape_renders_the_same_prompt_and_trains_only_the_answers(make_cfg, tmp_path, row):
    data = write_jsonl(tmp_path / "pairs.jsonl", [row] * 4)
    (example, *_), tokenizer = tokenized(make_cfg(stage="dpo", dataset_name=str(data), validation_split=0))
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert trained_text(tokenizer, example["input_ids"], example["loss_weights"]) == "Paris<|im_end|>"
    assert trained_text(tokenizer, example["paired_ids"], example["paired_weights"]) == "Lyon<|im_end|>"
    for ids, weights in ((example["input_ids"], example["loss_weights"]),
                         (example["paired_ids"], example["paired_weights"])):
        first = list(weights).index(1)
        assert tokenizer.decode(ids[:first]) == prompt


def test_kto_rows_keep_their_label_and_pair_each_prompt_with_the_next_rows_answer(make_cfg, tmp_path):
    rows = [{"prompt": f"Say {w}.", "completion": w, "label": i % 2 == 0} for i, w in enumerate(["red", "blue", "tan"])]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    examples, tokenizer = tokenized(make_cfg(stage="kto", dataset_name=str(data), validation_split=0,
                                             prompt_format="raw"))
    assert [e["label"] for e in examples] == [True, False, True]
    assert [trained_text(tokenizer, e["input_ids"], e["loss_weights"]) for e in examples] == ["red<|im_end|>",
                                                                                           "blue<|im_end|>",
                                                                                           "tan<|im_end|>"]
    assert [tokenizer.decode(e["paired_ids"]) for e in examples] == ["Say red.blue<|im_end|>",
                                                                      "Say blue.tan<|im_end|>",
                                                                      "Say tan.red<|im_end|>"]


def test_preview_shows_both_answers_with_their_trained_tokens(make_cfg, pairs_file, capsys):
    finetune.preview_run(make_cfg(stage="dpo", dataset_name=str(pairs_file), validation_split=0,
                                  prompt_format="raw"), rows=1, colour=False)
    out = capsys.readouterr().out
    assert "row 1, chosen: " in out and "Say the number after 0.[[1<|im_end|>]]" in out
    assert "row 1, rejected: " in out and "Say the number after 0.[[2<|im_end|>]]" in out


# --- train: log-probabilities and the losses ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_log_probabilities_and_their_gradients_equal_log_softmax(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, requires_grad=True)
    head = torch.randn(300, 16, requires_grad=True)  # a trained head: its gradient is formed in the backward
    targets, upstream = torch.randint(0, 300, (9,)), torch.randn(9)
    fused = finetune.fused_token_logps().apply(hidden, head, targets, dtype, True)
    (fused * upstream).sum().backward()
    grads = hidden.grad.clone(), head.grad.clone()
    hidden.grad = head.grad = None
    plain = torch.log_softmax(hidden @ head.t(), -1).gather(1, targets[:, None]).squeeze(1)
    (plain * upstream).sum().backward()
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    assert torch.allclose(fused, plain, atol=tolerance)
    assert torch.allclose(grads[0], hidden.grad, atol=tolerance) and torch.allclose(grads[1], head.grad, atol=tolerance)


def hand_logps(model, ids, weights) -> float:
    """The sum of log p over a sequence's trained tokens, the sequence run alone, logits computed whole."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    return float((logps * (torch.tensor(weights[1:]) == 1)).sum())


def perturbed_trainer(cfg):
    """The trainer of a run with the reference computed, then its LoRA B matrices set off zero: a policy that differs
    from the reference, as after some steps."""
    from test_train import trainer_of

    context = trainer_of(cfg)
    trainer, run = context.__enter__()
    trainer.train_dataset = trainer.with_reference(trainer.train_dataset, "training")
    torch.manual_seed(1)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.5)
    return context, trainer, run


@pytest.mark.parametrize("stage, losses", [("dpo", ["sigmoid", "sft"]), ("dpo", ["ipo"]), ("kto", ["kto"])])
@pytest.mark.parametrize("padding_free", [True, False])
def test_loss_equals_the_formula_computed_by_hand(make_cfg, tmp_path, stage, losses, padding_free):
    rows = pair_rows(4) if stage == "dpo" else [{"prompt": f"Say {i}.", "completion": f"{i}", "label": i % 2 == 0}
                                                for i in range(4)]
    cfg = make_cfg(stage=stage, loss_type=losses, dataset_name=str(write_jsonl(tmp_path / "d.jsonl", rows)),
                   validation_split=0, beta=0.5, desirable_weight=1.5, prompt_format="raw")
    context, trainer, run = perturbed_trainer(cfg)
    try:
        examples = [trainer.train_dataset[i] for i in range(4)]
        model = trainer.model
        batch = finetune.collate_pairs(examples, run.tokenizer.pad_token_id, padding_free, stage == "kto")
        with torch.no_grad():
            loss = float(trainer.compute_loss(model, batch))
            policy = [[hand_logps(model, e["input_ids"], e["loss_weights"]),
                       hand_logps(model, e["paired_ids"], e["paired_weights"])] for e in examples]
    finally:
        context.__exit__(None, None, None)
    ref = [e["ref_logps"] for e in examples]
    counts = [sum(w == 1 for w in e["loss_weights"][1:]) for e in examples]
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = 0.0
    for (pc, pr), (rc, rr), n, e in zip(policy, ref, counts, examples):
        c, r = pc - rc, pr - rr
        if losses == ["sigmoid", "sft"]:
            expected += -math.log(sigmoid(0.5 * (c - r))) - pc / n
        elif losses == ["ipo"]:
            n_r = sum(w == 1 for w in e["paired_weights"][1:])
            expected += (c / n - r / n_r - 1 / (2 * 0.5)) ** 2
        else:
            kl = max(0.0, sum(p[1] - q[1] for p, q in zip(policy, ref)) / len(examples))
            expected += 1.5 * (1 - sigmoid(0.5 * (c - kl))) if e["label"] else 1 - sigmoid(0.5 * (kl - c))
    assert loss == pytest.approx(expected / len(examples), rel=1e-4)


# --- the run end to end: scores before and after -----------------------------------------------------------------

# DPO with LoRA: dpo_after_sft below.
@pytest.mark.parametrize("stage, changes", [("dpo", {"use_peft": False, "learning_rate": 1e-3}), ("kto", {})],
                         ids=["dpo-full", "kto-lora"])
def test_a_preference_run_starts_at_the_reference_and_learns_the_preferred_answers(make_cfg, tmp_path, stage,
                                                                                  changes):
    rows = [{"prompt": f"Say the number after {i}.", "chosen": "alpha", "rejected": "omega"} for i in range(16)]
    if stage == "kto":
        rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows
                for k in ("chosen", "rejected")]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(**{**dict(stage=stage, dataset_name=str(data), test_dataset=str(data), validation_split=0,
                             max_steps=12, learning_rate=2e-2, peft_lora_alpha=64, eval_before=True, beta=0.5,
                             eval_max_examples=8, prompt_format="raw"), **changes})
    out = finetune.run_training(cfg)
    first = logged(out)[0]
    assert first["loss"] == pytest.approx(math.log(2) if stage == "dpo" else 0.5, abs=1e-3)  # policy = reference
    summary = json.loads((out / "eval.json").read_text())
    before, after = summary["base"], summary["fine_tuned"]
    assert before["reward_margin"] == 0
    assert after["reward_margin"] > 0.1 and after["preference_accuracy"] >= 0.75 > before["preference_accuracy"]
    assert after[{"dpo": "pairs", "kto": "rows"}[stage]] == 8
    assert after["examples"] == (8 if stage == "dpo" else 4)  # generation is scored against the good answers only


@pytest.fixture(scope="module")
def dpo_after_sft(tmp_path_factory, finished_run):
    """A copy of the session's SFT run (LoRA, chat), and a DPO run started from its folder, merged and exported:
    (the SFT run's folder, its summary, the DPO run's folder)."""
    _, sft_out = finished_run
    folder = tmp_path_factory.mktemp("dpo-after-sft")
    sft = shutil.copytree(sft_out, folder / "sft")
    tests = [json.loads(line) for line in DEMO_TEST.read_text().splitlines()[:3]]
    data = write_jsonl(folder / "pairs.jsonl", [{"prompt": t["prompt"], "chosen": t["completion"],
                                                 "rejected": t["completion"][::-1]} for t in tests] * 4)
    cfg = finetune.Config(**{**FAST, "model_name": str(sft), "stage": "dpo", "loss_type": ["sigmoid", "sft"],
                             "dataset_name": str(data), "test_dataset": str(data), "eval_max_examples": 3,
                             "validation_split": 0, "eval_before": True, "max_steps": 6, "learning_rate": 2e-2,
                             "merge_adapter": True, "export_gguf": "f16", "output_dir": str(folder / "dpo")})
    return sft, json.loads((sft / "eval.json").read_text()), finetune.run_training(cfg)


@pytest.mark.slow
def test_dpo_starts_from_the_sft_runs_model(dpo_after_sft):
    sft, sft_summary, dpo = dpo_after_sft
    assert (sft / "merged" / "config.json").is_file()  # the adapter merged once, where `merge` writes it
    base = json.loads((dpo / "eval.json").read_text())["base"]
    assert base["exact_match"] == sft_summary["fine_tuned"]["exact_match"]  # the same 3 prompts, the same model
    assert base["token_f1"] == sft_summary["fine_tuned"]["token_f1"]
    assert json.loads((dpo / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft / "merged")
    first = logged(dpo)[0]
    assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0  # the policy starts as the reference
    after = json.loads((dpo / "eval.json").read_text())["fine_tuned"]
    assert after["preference_accuracy"] == 1 > base["preference_accuracy"] and after["reward_margin"] > 0.5


@pytest.mark.slow
def test_dpo_after_sft_merges_exports_and_is_scored_again_by_eval(dpo_after_sft, capfd):
    _, _, dpo = dpo_after_sft
    summary = json.loads((dpo / "eval.json").read_text())
    exported = summary["exported"][f"{dpo.name}-f16.gguf"]
    assert exported["same_answers"] == 3  # the exported file answers as the trained model in llama.cpp
    assert (dpo / "merged" / "model.safetensors").is_file()
    code, out, err = run_main(capfd, "eval", "--model", str(dpo))
    assert code == 0, err[-2000:]
    assert "preference_accuracy" in out
    again = json.loads((dpo / "eval.json").read_text())["fine_tuned"]
    for key in ("preference_accuracy", "reward_margin", "chosen_logp"):
        assert again[key] == pytest.approx(summary["fine_tuned"][key], abs=0.02)


# --- memory ------------------------------------------------------------------------------------------------------

def test_the_estimate_counts_dpos_two_sequences_per_example(make_cfg):
    from helpers import plan_for

    sft, dpo = make_cfg(), make_cfg(stage="dpo")
    model_config = finetune.load_model_config(sft)
    plan = plan_for(sft)
    activations = [finetune.estimate_memory(cfg, model_config, plan)["activations"] for cfg in (sft, dpo)]
    assert activations[1] == 2 * activations[0]
