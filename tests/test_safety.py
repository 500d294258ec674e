"""Nothing lost, nothing leaked: resume after SIGKILL with the same losses, SIGINT/SIGTERM save a checkpoint,
cut-off checkpoints are skipped, one run per output_dir, secrets never reach a file."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import finetune
from conftest import ROOT


def write_config(path: Path, cfg: finetune.Config) -> Path:
    path.write_text(json.dumps(cfg.model_dump()))
    return path


def start_cli(config: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), "--config", str(config), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before the test could act: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def step_losses(metrics: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (re-run after a resume) keeps its last value."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def long_run(make_cfg, out: Path, **overrides) -> finetune.Config:
    return make_cfg(output_dir=str(out), max_steps=60, batch_size=2, save_strategy="steps", save_steps=3,
                    save_total_limit=3, **overrides)


def test_resume_after_sigkill_continues_with_identical_losses(make_cfg, tmp_path, cli):
    reference = long_run(make_cfg, tmp_path / "reference")
    assert cli("--config", str(write_config(tmp_path / "ref.yml", reference))).returncode == 0
    expected = step_losses(tmp_path / "reference" / "metrics.jsonl")

    crashed = long_run(make_cfg, tmp_path / "crashed")
    config = write_config(tmp_path / "crash.yml", crashed)
    proc = start_cli(config)
    wait_for(lambda: (tmp_path / "crashed" / "checkpoint-6" / "trainer_state.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "crashed" / "final").exists()

    resumed = cli("--config", str(config), "resume_from_checkpoint=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    got = step_losses(tmp_path / "crashed" / "metrics.jsonl")
    assert sorted(got) == sorted(expected) == list(range(1, 61))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(make_cfg, tmp_path, cli, sig):
    cfg = make_cfg(output_dir=str(tmp_path / "run"), max_steps=400, batch_size=2, save_strategy="steps", save_steps=10_000)
    config = write_config(tmp_path / "run.yml", cfg)
    proc = start_cli(config)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(step_losses(metrics)) >= 5, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    message = stderr.strip().splitlines()[-1]
    assert "resume_from_checkpoint=auto" in message and "Traceback" not in stderr
    step = int(message.split("stopped at step ")[1].split()[0])
    assert 5 <= step < 400
    assert finetune.checkpoint_problem(tmp_path / "run" / f"checkpoint-{step}") is None
    assert not (tmp_path / "run" / "final").exists()
    resumed = cli("--config", str(config), "resume_from_checkpoint=auto", "max_steps=" + str(step + 3))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "final" / "eval.json").read_text())["steps"] == step + 3


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_cut_off_checkpoint_is_skipped_for_the_previous_one(make_cfg, tmp_path, capsys, damaged):
    cfg = make_cfg(max_steps=4, save_strategy="steps", save_steps=2)
    finetune.run_training(cfg)
    truncate(tmp_path / "out" / "checkpoint-4" / damaged)
    resume = cfg.model_copy(update={"resume_from_checkpoint": "auto"})
    assert finetune.resolve_checkpoint(resume) == str(tmp_path / "out" / "checkpoint-2")
    assert "skipping checkpoint-4" in capsys.readouterr().out


def test_named_cut_off_checkpoint_is_refused(make_cfg, tmp_path):
    cfg = make_cfg(max_steps=2, save_strategy="steps", save_steps=2)
    finetune.run_training(cfg)
    (tmp_path / "out" / "checkpoint-2" / "scheduler.pt").unlink()
    named = cfg.model_copy(update={"resume_from_checkpoint": str(tmp_path / "out" / "checkpoint-2")})
    with pytest.raises(finetune.UserError, match="scheduler.pt is missing"):
        finetune.resolve_checkpoint(named)


def test_second_run_on_the_same_output_dir_refuses_and_the_first_finishes(make_cfg, tmp_path, capsys):
    cfg = make_cfg(output_dir=str(tmp_path / "run"), max_steps=150, batch_size=2)
    proc = start_cli(write_config(tmp_path / "run.yml", cfg))
    wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists(), proc)
    second = cfg.model_copy(update={"resume_from_checkpoint": "auto"})
    assert finetune.main(["--config", str(write_config(tmp_path / "second.yml", second))]) == 2
    assert "in use by a running job" in capsys.readouterr().err
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()


def test_secrets_never_reach_any_output_file(make_cfg, tmp_path, cli):
    token, key = "hf_PLANTEDtoken1234567890abcdef", "PLANTEDwandbkey0123456789abcdef01234567"
    cfg = make_cfg(output_dir=str(tmp_path / "run"), max_steps=2, report_to="all", merge_adapter=True,
                   save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1, validation_split=0.25)
    env = {"HF_TOKEN": token, "WANDB_API_KEY": key, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"),
           "WANDB_SILENT": "true"}
    result = cli("--config", str(write_config(tmp_path / "run.yml", cfg)), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    files = [p for p in [*(tmp_path / "run").rglob("*"), *(tmp_path / "wb").rglob("*")] if p.is_file()]
    assert len(files) > 20 and any(p.suffix == ".wandb" for p in files)
    for path in files:
        data = path.read_bytes()
        assert token.encode() not in data and key.encode() not in data, path
    assert token not in result.stdout + result.stderr and key not in result.stdout + result.stderr


def test_trust_remote_code_warns_naming_the_repository(make_cfg, capsys):
    cfg = make_cfg(trust_remote_code=True)
    finetune.load_base_model(cfg, "fp32", "cpu", attn=None)
    err = capsys.readouterr().err
    assert "trust_remote_code" in err and cfg.model_name in err


def test_final_save_is_all_or_nothing(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(max_steps=2, save_strategy="steps", save_steps=2)
    final = finetune.run_training(cfg)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    trainer, tokenizer, *_ = finetune.prepare_trainer(cfg.model_copy(update={"resume_from_checkpoint": "auto", "max_steps": 3}))
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenizer, "save_pretrained", disk_full)  # fails after the weights are written aside
    with pytest.raises(OSError):
        finetune.write_final(trainer, tokenizer, cfg, {"steps": 3})
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
