"""End to end on the embedded SmolLM2-135M-Instruct: the default job (the shipped config.yml, shortened) must beat the
base model, and its q8_0 GGUF export, scored by `finetune.py eval`, is at most one answer from the merged model's exact
match. (f16 files give the merged model's logits on the tiny models of test_export.py; how many q8_0 answers equal the
merged model's, over the full default job, is bench/export_check.py's: 100 of 100 in the README.)"""

import json

import pytest

import finetune
from helpers import DEMO_TEST, run_main


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
def test_the_q8_0_export_scores_as_the_merged_model(demo_run, capfd):
    out, _ = demo_run
    run = finetune.open_run(out)
    cfg, tokenizer, prompts = run.cfg, run.tokenizer, [p.ids for p in run.test_pairs]
    reference, _ = finetune.generate_answers(finetune.merged_model(run).float(), tokenizer, prompts,
                                             cfg.eval_max_new_tokens, run.plan.stop_ids)
    finetune.export_run(run, "q8_0")
    code, _, err = run_main(capfd, "eval", "--model", str(out / "gguf" / "run-q8_0.gguf"))
    assert code == 0, err
    summary = json.loads((out / "eval.json").read_text())
    gguf_exact = summary["exported"]["run-q8_0.gguf"]["exact_match"]
    merged_exact = sum(a.strip() == r["completion"].strip() for a, r in zip(
        reference, [json.loads(line) for line in DEMO_TEST.read_text().splitlines()])) / len(reference)
    assert abs(gguf_exact - merged_exact) <= 1 / len(reference) + 1e-9  # at most one answer's worth apart
