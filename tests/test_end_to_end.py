"""The CLI end to end on the embedded SmolLM2-135M-Instruct with the shipped config.yml: a short LoRA run that must
beat the base model, with its checkpoints, curves and result in output_dir."""

import json

import pytest

from helpers import DEMO_TEST, ROOT, write_jsonl


@pytest.mark.slow
def test_the_shipped_config_fine_tunes_the_embedded_model_and_beats_the_base(cli, tmp_path, embedded_model):
    test_rows = [json.loads(line) for line in DEMO_TEST.read_text().splitlines()[:12]]
    test_file = write_jsonl(tmp_path / "test.jsonl", test_rows)
    out = tmp_path / "run"
    result = cli("--config", str(ROOT / "config.yml"), f"output_dir={out}", f"test_dataset={test_file}",
                 "max_steps=12", "learning_rate=1e-3", "eval_steps=6", "logging_steps=3", "save_steps=6")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fine-tuned" in result.stdout and "json_field_accuracy" in result.stdout
    summary = json.loads((out / "eval.json").read_text())
    assert summary["base"]["examples"] == summary["fine_tuned"]["examples"] == 12
    assert summary["fine_tuned"]["json_valid"] > summary["base"]["json_valid"]
    assert summary["fine_tuned"]["token_f1"] > summary["base"]["token_f1"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
