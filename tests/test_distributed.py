"""Data-parallel training with torchrun on the CPU (gloo): one normal output folder, written by rank 0 only, with
each rank training on its own share of the data, in the sft and dpo stages. FSDP/DeepSpeed settings are passed through
to the HF Trainer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
from helpers import ROOT, logged, plan_for, write_config, write_jsonl


def torchrun(cfg, tmp_path) -> subprocess.CompletedProcess:
    config = write_config(tmp_path / "run.yml", **cfg.model_dump(mode="json"))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "finetune.py"), "--config", config],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.slow
def test_torchrun_two_processes_share_the_data_and_write_one_output(make_cfg, tmp_path):
    cfg = make_cfg(validation_split=0.25, max_steps=-1, num_train_epochs=1, batch_size=4, prompt_format="raw",
                   output_dir=str(tmp_path / "run"))
    result = torchrun(cfg, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "result.json").read_text())["files"] and not list(run.glob("checkpoint-*"))
    # 36 training rows, 4 per step: one process takes 9 steps an epoch, two processes with disjoint halves take 5
    trained = [r for r in logged(run) if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4, 5]
    tokenizer = finetune.load_tokenizer(cfg)
    lengths = finetune.load_data(cfg, plan_for(cfg, tokenizer), tokenizer, finetune.load_sources(cfg)).train["length"]
    # Every training token is seen by one rank or the other; accelerate evens out each rank's short last batch
    # (18 rows = 4+4+4+4+2) by repeating 2 rows, so at most 4 rows are counted twice.
    assert sum(lengths) <= trained[-1]["num_tokens"] <= sum(lengths) + 4 * max(lengths)


@pytest.mark.slow
def test_torchrun_trains_a_preference_stage(make_cfg, tmp_path):
    rows = [{"prompt": f"Say the number after {i}.", "chosen": "alpha", "rejected": "omega"} for i in range(24)]
    cfg = make_cfg(stage="dpo", dataset_name=str(write_jsonl(tmp_path / "pairs.jsonl", rows)), validation_split=0,
                   max_steps=3, batch_size=2, prompt_format="raw", output_dir=str(tmp_path / "run"))
    result = torchrun(cfg, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = [r for r in logged(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3] and trained[0]["rewards/margins"] == 0


def test_fsdp_on_cpu_says_it_runs_plain_data_parallel(make_cfg, capsys):
    machine = finetune.Machine(device="cpu", rank=0, local_rank=0, world_size=2, local_world_size=2, memory=0)
    finetune.check_sharding(make_cfg(fsdp=True), machine)  # accelerate has no FSDP on CPU: said, not hidden
    assert "on this CPU the run uses plain data parallel" in capsys.readouterr().err
    finetune.check_sharding(make_cfg(), machine)
    assert not capsys.readouterr().err


def test_fsdp_and_deepspeed_settings_reach_the_trainer(make_cfg):
    cfg = make_cfg(fsdp=True, fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    plan = plan_for(cfg)
    args = finetune.make_training_args(cfg, plan, 4, False)
    assert args.fsdp and args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert not finetune.make_training_args(make_cfg(), plan, 4, False).fsdp


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_file(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=2, output_dir=str(tmp_path / "run"))
    config = write_config(tmp_path / "run.yml", **cfg.model_dump(mode="json"))
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(accelerate), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "finetune.py"),
                             "--config", config], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
