"""Training on the tiny model: the loss is the intended weighted loss on every batch shape and equals TRL's, it falls,
accumulation equals a large batch, the schedule and options (warmup, NEFTune, DoRA, rsLoRA) act, checkpoints rotate,
and validation loss can stop the run and pick its weights."""

import json
from contextlib import contextmanager

import pytest
import torch

import finetune
from helpers import logged, write_jsonl


@contextmanager
def trainer_of(cfg: finetune.Config):
    """The trainer of a run, as run_training builds it, with the output folder locked while it is used."""
    with finetune.prepared_run(cfg) as run:
        yield finetune.make_trainer(cfg, run, finetune.build_model(cfg, run.plan)), run


def trained(cfg: finetune.Config):
    with trainer_of(cfg) as (trainer, _):
        trainer.train()
    return trainer


def loss_reference(model, rows: list[dict]) -> torch.Tensor:
    """sum_i w_i * CE_i / sum_i w_i over every example, each run alone through the model: no packing, no fusion."""
    total, weight = 0.0, 0.0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        w = torch.tensor(row["loss_weights"])[1:]
        logits = model(input_ids=ids).logits[0, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total, weight = total + (ce * w).sum(), weight + w.sum()
    return total / weight


@pytest.mark.parametrize("prompt_loss_weight", [0.0, 0.1, 1.0])
def test_loss_equals_the_hand_computed_weighted_loss(make_cfg, prompt_loss_weight):
    with trainer_of(make_cfg(prompt_loss_weight=prompt_loss_weight, use_peft=False)) as (trainer, run):
        rows = [trainer.train_dataset[i] for i in range(4)]
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, finetune.collate(rows, run.tokenizer.pad_token_id, True))
        assert loss.item() == pytest.approx(loss_reference(trainer.model, rows).item(), rel=1e-4)


def test_padded_and_padding_free_batches_give_the_same_loss(make_cfg):
    with trainer_of(make_cfg(prompt_loss_weight=0.1)) as (trainer, run):
        rows = [trainer.train_dataset[i] for i in range(4)]
        losses = [trainer.compute_loss(trainer.model, finetune.collate(rows, run.tokenizer.pad_token_id, free)).item()
                  for free in (True, False)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_completion_only_loss_equals_trls(make_cfg, pc_file):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = make_cfg(prompt_loss_weight=0.0, use_peft=False, prompt_format="raw", validation_split=0)
    raw = [json.loads(line) for line in pc_file.read_text().splitlines()[:4]]
    with trainer_of(cfg) as (trainer, run):
        trl = SFTTrainer(model=trainer.model, processing_class=run.tokenizer, train_dataset=Dataset.from_list(raw),
                         args=SFTConfig(output_dir=cfg.output_dir + "-trl", completion_only_loss=True,
                                        report_to="none", use_cpu=True, per_device_train_batch_size=4))
        trl_batch = trl.data_collator([trl.train_dataset[i] for i in range(4)])
        (source,) = run.data.sources
        rows = Dataset.from_list(raw).add_column(finetune.ROW, [1, 2, 3, 4])
        examples, _ = finetune.tokenize_rows(rows, source, run.tokenizer, cfg, run.plan)
        ours = finetune.collate(examples.to_list(), run.tokenizer.pad_token_id, padding_free=False)
        assert torch.equal(trl_batch["input_ids"], ours["input_ids"])
        assert trl.compute_loss(trainer.model, trl_batch).item() == pytest.approx(
            trainer.compute_loss(trainer.model, ours).item(), rel=1e-5)


def test_fused_loss_gradients_match_full_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float32, requires_grad=True)
    targets, token_w = torch.randint(0, 50, (37,)), torch.rand(37, dtype=torch.float32)
    loss, _ = finetune.fused_linear_cross_entropy().apply(hidden, weight, targets, token_w, token_w.sum(),
                                                          torch.float32, True)
    loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    (reference * token_w).sum().div(token_w.sum()).backward()
    assert loss.item() == pytest.approx(((reference * token_w).sum() / token_w.sum()).item(), rel=1e-5)
    assert torch.allclose(got[0], hidden.grad, atol=1e-6) and torch.allclose(got[1], weight.grad, atol=1e-6)


def test_evaluation_reports_the_token_accuracy_of_the_completion(make_cfg):
    """Token accuracy goes through TRL's private _metrics (trl 1.16, pinned): an upgrade that drops it must fail here.
    (transformers' private _get_num_items_in_batch carries the loss denominator: the accumulation test below fails
    without it, since prompt_loss_weight makes the weights differ from the token count transformers would use.)"""
    with trainer_of(make_cfg(validation_split=0.25, eval_strategy="steps", use_peft=False)) as (trainer, run):
        metrics = trainer.evaluate()
        # By hand: in each batch of validation rows (in order), the share of completion tokens (weight 1) whose
        # argmax prediction is right; averaged over the batches.
        rows = [run.data.validation[i] for i in range(len(run.data.validation))]
        shares = []
        for start in range(0, len(rows), run.plan.batch_size):
            right = total = 0
            for row in rows[start:start + run.plan.batch_size]:
                ids = torch.tensor([row["input_ids"]])
                with torch.no_grad():
                    predicted = trainer.model(input_ids=ids).logits[0, :-1].argmax(-1)
                completion = torch.tensor(row["loss_weights"])[1:] == 1
                right += int((predicted == ids[0, 1:])[completion].sum())
                total += int(completion.sum())
            shares.append(right / total)
    assert len(shares) == 3 and metrics["eval_mean_token_accuracy"] == pytest.approx(sum(shares) / 3, abs=1e-6)


def test_gradient_accumulation_matches_one_large_batch(make_cfg, tmp_path):
    params = []
    for batch_size, accumulation in [(8, 1), (4, 2)]:
        cfg = make_cfg(output_dir=str(tmp_path / f"ga{accumulation}"), max_steps=1, batch_size=batch_size,
                       gradient_accumulation_steps=accumulation, prompt_loss_weight=0.1, optim="sgd",
                       learning_rate=1.0, max_grad_norm=0, warmup_ratio=0, lr_scheduler_type="constant")
        params.append({n: p.detach().clone() for n, p in trained(cfg).model.named_parameters() if p.requires_grad})
    for name in params[0]:
        assert torch.allclose(params[0][name], params[1][name], atol=1e-6), name


def test_loss_falls_on_a_repeated_batch(make_cfg, tmp_path, pc_rows):
    # A full fine-tune: the tiny model's random tied embedding bounds its logits near uniform until it is trained itself
    # (LoRA learning is shown on the real model in the end-to-end test).
    data = write_jsonl(tmp_path / "eight.jsonl", pc_rows[:8] * 4)
    trainer = trained(make_cfg(dataset_name=str(data), max_steps=25, batch_size=8, learning_rate=3e-3,
                               use_peft=False, validation_split=0))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]


def test_warmup_ratio_warms_up_over_that_fraction_of_the_steps(make_cfg):
    # transformers 5 takes warmup_steps below 1 as a fraction of the run: 0.25 of 8 steps is 2 warmup steps.
    trainer = trained(make_cfg(max_steps=8, warmup_ratio=0.25, lr_scheduler_type="constant_with_warmup",
                               learning_rate=1e-3))
    rates = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert rates == pytest.approx([0.0, 5e-4] + [1e-3] * 6)


def three_steps(make_cfg, folder, **option):
    trainer = trained(make_cfg(output_dir=str(folder), max_steps=3, learning_rate=1e-2, **option))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_neftune_noise_changes_the_training_loss_from_the_first_step(make_cfg, tmp_path):
    plain, _ = three_steps(make_cfg, tmp_path / "plain")
    noisy, _ = three_steps(make_cfg, tmp_path / "neftune", neftune_noise_alpha=5.0)
    assert noisy[0] != plain[0]  # the adapter starts at zero: only the noise on the embeddings can move step 1


@pytest.mark.parametrize("option", ["use_dora", "use_rslora"])
def test_dora_and_rslora_train_other_weights_than_lora(make_cfg, tmp_path, option):
    _, plain = three_steps(make_cfg, tmp_path / "plain")
    _, other = three_steps(make_cfg, tmp_path / option, **{option: True})
    lora_b = [name for name in plain if "lora_B" in name]
    assert lora_b and all(not torch.equal(plain[name], other[name]) for name in lora_b)
    assert any("lora_magnitude_vector" in name for name in other) == (option == "use_dora")


def test_checkpoints_rotate_to_save_total_limit(make_cfg, tmp_path):
    trained(make_cfg(max_steps=5, save_strategy="steps", save_steps=1, save_total_limit=2))
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert (tmp_path / "out" / "checkpoint-5" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Validation loss guides the run: early stopping and the best checkpoint.
# ---------------------------------------------------------------------------------------------------------------------

def evaluations(out) -> list[tuple[int, float]]:
    return [(row["step"], row["eval_loss"]) for row in logged(out) if "eval_loss" in row]


def test_early_stopping_stops_after_patience_evaluations_without_improvement(overfitting):
    cfg = overfitting(early_stopping_patience=2)
    out = finetune.run_training(cfg)
    evals = evaluations(out)
    best_step, _ = min(evals, key=lambda e: e[1])
    assert evals[-1][0] == best_step + 2 * 2 < 30  # two evaluations, two steps apart, after the best
    summary = json.loads((out / "eval.json").read_text())
    assert (summary["steps"], summary["best_step"]) == (best_step + 4, best_step)


def test_load_best_model_at_end_keeps_the_best_checkpoint_and_ends_with_its_weights(overfitting, tmp_path):
    from safetensors.torch import load_file

    cfg = overfitting(load_best_model_at_end=True, save_total_limit=1, max_steps=16)
    out = finetune.run_training(cfg)
    best_step, best_loss = min(evaluations(out), key=lambda e: e[1])
    assert best_step < 16 and (out / f"checkpoint-{best_step}").is_dir()  # the limit never deletes the best
    final = load_file(out / "model.safetensors")
    best = load_file(out / f"checkpoint-{best_step}" / "model.safetensors")
    assert all(torch.equal(final[name], best[name]) for name in best)
    summary = json.loads((out / "eval.json").read_text())
    assert summary["best_step"] == best_step and summary["best_eval_loss"] == pytest.approx(best_loss, abs=1e-4)
    assert f"at step {best_step} (the weights here)" in (out / "README.md").read_text()
