"""End to end on the embedded SmolLM2-135M-Instruct: the default job (the shipped config.yml) must beat the base
model, then its GGUF export read back by transformers: the same answers as the merged model in f16, at least 95%
of them in q8_0, and an exact match within 2 points when `finetune.py eval` scores the q8_0 file."""

import json

import pytest
import torch

import finetune
from helpers import DEMO_TEST, ROOT, run_cli


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, embedded_model):
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run_cli("--config", str(ROOT / "config.yml"), f"output_dir={out}")  # the default job, as shipped
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result.stdout


@pytest.mark.slow
def test_the_shipped_config_fine_tunes_the_embedded_model_and_beats_the_base(demo_run):
    out, stdout = demo_run
    assert "fine-tuned" in stdout and "json_field_accuracy" in stdout
    summary = json.loads((out / "eval.json").read_text())
    assert summary["base"]["examples"] == summary["fine_tuned"]["examples"] == 60
    assert summary["fine_tuned"]["json_valid"] > summary["base"]["json_valid"]
    assert summary["fine_tuned"]["token_f1"] > summary["base"]["token_f1"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-21", "checkpoint-41"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()


@pytest.mark.slow
def test_the_gguf_export_answers_as_the_merged_model(demo_run):
    from transformers import AutoModelForCausalLM

    out, _ = demo_run
    run = finetune.open_run(out)
    cfg, tokenizer, prompts = run.cfg, run.tokenizer, [p.ids for p in run.test_pairs]
    reference, _ = finetune.generate_answers(finetune.merged_model(run).float(), tokenizer, prompts,
                                             cfg.eval_max_new_tokens)
    agreement = {}
    for gguf_type in ("f16", "q8_0"):
        path = finetune.export_run(run, gguf_type)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        answers, _ = finetune.generate_answers(model, tokenizer, prompts, cfg.eval_max_new_tokens)
        agreement[gguf_type] = sum(a == b for a, b in zip(answers, reference)) / len(reference)
    print(f"greedy agreement with the merged model: {agreement}")
    assert agreement["f16"] == 1.0 and agreement["q8_0"] >= 0.95

    scored = run_cli("eval", "--model", str(out / "gguf" / "run-q8_0.gguf"))
    assert scored.returncode == 0, scored.stderr[-2000:]
    summary = json.loads((out / "eval.json").read_text())
    gguf_exact = summary["exported"]["run-q8_0.gguf"]["exact_match"]
    merged_exact = sum(a.strip() == r["completion"].strip() for a, r in zip(
        reference, [json.loads(line) for line in DEMO_TEST.read_text().splitlines()])) / len(reference)
    assert abs(gguf_exact - merged_exact) <= 0.02
