"""Data-parallel training with torchrun on the CPU (gloo): one normal output folder, written by rank 0 only, with
each rank training on its own share of the data. FSDP/DeepSpeed are passed through to the HF Trainer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
from conftest import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp-on-cpu"])
def test_torchrun_two_processes_share_the_data_and_write_one_output(make_cfg, tmp_path, fsdp):
    cfg = make_cfg(validation_split=0.25, max_steps=-1, num_train_epochs=1, batch_size=4, output_dir=str(tmp_path / "run"),
                   fsdp=fsdp)
    config = tmp_path / "run.yml"
    config.write_text(json.dumps(cfg.model_dump()))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(ROOT / "finetune.py"), "--config", str(config)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("plain data parallel" in result.stderr) == fsdp  # accelerate has no FSDP on CPU: said, not hidden
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["final", "loss.png", "metrics.jsonl"]
    assert (run / "final" / "adapter_model.safetensors").exists()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    # 36 training rows, 4 per step: one process takes 9 steps an epoch, two processes with disjoint halves take 5
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5]
    tokenizer = finetune.load_tokenizer(cfg)
    train, _ = finetune.load_dataset_splits(cfg)
    lengths = finetune.tokenize_dataset(train, tokenizer, cfg, "train")[0]["length"]
    # Every training token is seen by one rank or the other; accelerate evens out each rank's short last batch
    # (18 rows = 4+4+4+4+2) by repeating 2 rows, so at most 4 rows are counted twice.
    assert sum(lengths) <= logged[-1]["num_tokens"] <= sum(lengths) + 4 * max(lengths)


def test_fsdp_in_a_single_process_is_a_user_error(make_cfg):
    with pytest.raises(finetune.UserError, match="torchrun"):
        finetune.prepare_trainer(make_cfg(fsdp=True))


def test_deepspeed_config_file_must_exist(make_cfg, tmp_path):
    with pytest.raises(finetune.UserError, match="deepspeed: config file not found"):
        finetune.prepare_trainer(make_cfg(deepspeed=str(tmp_path / "ds.json")))


def test_fsdp_and_deepspeed_settings_reach_the_trainer(make_cfg, tmp_path):
    fsdp = make_cfg(fsdp=True, fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    args = finetune.make_training_args(fsdp, "fp32", "cpu", False, False)
    assert args.fsdp and args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert not finetune.make_training_args(make_cfg(), "fp32", "cpu", False, False).fsdp
    with pytest.raises(ValueError, match="fsdp and deepspeed"):
        make_cfg(fsdp=True, deepspeed="ds.json")


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_file(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=2, output_dir=str(tmp_path / "run"))
    config = tmp_path / "run.yml"
    config.write_text(json.dumps(cfg.model_dump()))
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(accelerate), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "finetune.py"),
                             "--config", str(config)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()
