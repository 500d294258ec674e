"""End to end on the embedded SmolLM2-135M-Instruct: the default job (the shipped config.yml, shortened) must beat the
base model; its f16 GGUF export, read back by transformers, answers exactly as the merged model, and its q8_0 export,
scored by `finetune.py eval`, is at most one answer from the merged model's exact match. (How many q8_0 answers equal
the merged model's, over the full default job, is bench/export_check.py's: 100 of 100 in the README.)"""

import json

import pytest
import torch

import finetune
from helpers import DEMO_TEST, run_cli


@pytest.mark.slow
def test_the_shipped_config_fine_tunes_the_embedded_model_and_beats_the_base(demo_run):
    out, stdout = demo_run
    assert "fine-tuned" in stdout and "json_field_accuracy" in stdout
    summary = json.loads((out / "eval.json").read_text())
    assert summary["base"]["examples"] == summary["fine_tuned"]["examples"] == 20
    assert summary["fine_tuned"]["json_valid"] > summary["base"]["json_valid"]
    assert summary["fine_tuned"]["token_f1"] > summary["base"]["token_f1"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-8"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()


@pytest.mark.slow
def test_the_gguf_export_answers_as_the_merged_model(demo_run):
    from transformers import AutoModelForCausalLM

    out, _ = demo_run
    run = finetune.open_run(out)
    cfg, tokenizer, prompts = run.cfg, run.tokenizer, [p.ids for p in run.test_pairs]
    reference, _ = finetune.generate_answers(finetune.merged_model(run).float(), tokenizer, prompts,
                                             cfg.eval_max_new_tokens, run.plan.stop_ids)
    path = finetune.export_run(run, "f16")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    answers, _ = finetune.generate_answers(model, tokenizer, prompts, cfg.eval_max_new_tokens, run.plan.stop_ids)
    assert answers == reference

    finetune.export_run(run, "q8_0")
    scored = run_cli("eval", "--model", str(out / "gguf" / "run-q8_0.gguf"))
    assert scored.returncode == 0, scored.stderr[-2000:]
    summary = json.loads((out / "eval.json").read_text())
    gguf_exact = summary["exported"]["run-q8_0.gguf"]["exact_match"]
    merged_exact = sum(a.strip() == r["completion"].strip() for a, r in zip(
        reference, [json.loads(line) for line in DEMO_TEST.read_text().splitlines()])) / len(reference)
    assert abs(gguf_exact - merged_exact) <= 1 / len(reference) + 1e-9  # at most one answer's worth apart
