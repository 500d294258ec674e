"""Nothing lost, nothing leaked: resume after SIGKILL with the same losses (a list of datasets included), SIGINT/SIGTERM
save a checkpoint, cut-off checkpoints are skipped, the best checkpoint survives a resume, one run per output_dir,
results replaced whole, secrets never reach a file."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import finetune
from helpers import ROOT, logged, write_config, write_jsonl


def config_file(path: Path, cfg: finetune.Config) -> Path:
    write_config(path, **cfg.model_dump(mode="json"))
    return path


def start_cli(config: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), "--config", str(config), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before the test could act: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def step_losses(out: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (re-run after a resume) keeps its last value."""
    return {r["step"]: r["loss"] for r in logged(out) if "loss" in r}


@pytest.mark.slow
def test_resume_after_sigkill_continues_with_identical_losses_and_data_order(make_cfg, tmp_path, cli, pc_rows):
    mix = [{"name": str(write_jsonl(tmp_path / "a.jsonl", pc_rows[:24])), "weight": 2},
           {"name": str(write_jsonl(tmp_path / "b.jsonl", pc_rows[24:])), "weight": 1}]

    def long_run(out: Path) -> finetune.Config:
        return make_cfg(dataset_name=mix, output_dir=str(out), max_steps=20, batch_size=2, save_strategy="steps",
                        save_steps=3, save_total_limit=3)

    assert cli("--config", str(config_file(tmp_path / "ref.yml", long_run(tmp_path / "reference")))).returncode == 0
    expected = step_losses(tmp_path / "reference")

    config = config_file(tmp_path / "crash.yml", long_run(tmp_path / "crashed"))
    proc = start_cli(config)
    wait_for(lambda: (tmp_path / "crashed" / "checkpoint-6" / "trainer_state.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "crashed" / "result.json").exists()

    resumed = cli("--config", str(config), "resume_from_checkpoint=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    got = step_losses(tmp_path / "crashed")
    assert sorted(got) == sorted(expected) == list(range(1, 21))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(make_cfg, tmp_path, cli, sig):
    cfg = make_cfg(output_dir=str(tmp_path / "run"), max_steps=400, batch_size=2, save_strategy="steps",
                   save_steps=10_000)
    config = config_file(tmp_path / "run.yml", cfg)
    proc = start_cli(config)
    wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists() and len(step_losses(tmp_path / "run")) >= 5, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    message = stderr.strip().splitlines()[-1]
    assert "resume_from_checkpoint=auto" in message and "Traceback" not in stderr
    step = int(message.split("stopped at step ")[1].split()[0])
    assert 5 <= step < 400
    assert finetune.checkpoint_problem(tmp_path / "run" / f"checkpoint-{step}") is None
    assert not (tmp_path / "run" / "result.json").exists()
    if sig == signal.SIGTERM:
        return  # the same checkpoint as SIGINT's, resumed below
    resumed = cli("--config", str(config), "resume_from_checkpoint=auto", f"max_steps={step + 3}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["steps"] == step + 3


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tiny_model, pc_rows):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("checkpointed")
    cfg = finetune.Config(model_name=str(tiny_model), dataset_name=str(write_jsonl(folder / "d.jsonl", pc_rows)),
                          output_dir=str(folder / "out"), max_steps=4, batch_size=4, save_strategy="steps",
                          save_steps=2, eval_strategy="no", eval_before=False, precision="fp32")
    finetune.run_training(cfg)
    return cfg


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_cut_off_checkpoint_is_skipped_for_the_previous_one(checkpointed, tmp_path, capsys, damaged):
    import shutil

    out = Path(shutil.copytree(checkpointed.output_dir, tmp_path / "out"))
    truncate(out / "checkpoint-4" / damaged)
    resume = checkpointed.model_copy(update={"resume_from_checkpoint": "auto", "output_dir": str(out)})
    assert finetune.resolve_checkpoint(resume) == str(out / "checkpoint-2")
    assert "skipping checkpoint-4" in capsys.readouterr().out


@pytest.mark.slow
def test_a_resumed_run_keeps_its_best_checkpoint(overfitting, tmp_path, cli):
    cfg = overfitting(output_dir=str(tmp_path / "run"), save_total_limit=1, load_best_model_at_end=True)
    config = config_file(tmp_path / "run.yml", cfg)
    proc = start_cli(config)
    wait_for(lambda: (tmp_path / "run" / "checkpoint-16" / "trainer_state.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = cli("--config", str(config), "resume_from_checkpoint=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    evals = [(r["step"], r["eval_loss"]) for r in logged(tmp_path / "run") if "eval_loss" in r]
    best_step = min(evals, key=lambda e: e[1])[0]
    assert best_step < 16  # the best came before the kill: the resumed run must remember it
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["best_step"] == best_step
    assert (tmp_path / "run" / f"checkpoint-{best_step}").is_dir()


@pytest.mark.slow
def test_second_run_on_the_same_output_dir_refuses_and_the_first_finishes(make_cfg, tmp_path, capsys):
    cfg = make_cfg(output_dir=str(tmp_path / "run"), max_steps=60, batch_size=2)
    proc = start_cli(config_file(tmp_path / "run.yml", cfg))
    wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists(), proc)
    second = cfg.model_copy(update={"resume_from_checkpoint": "auto"})
    assert finetune.main(["--config", str(config_file(tmp_path / "second.yml", second))]) == 2
    assert "in use by a running job" in capsys.readouterr().err
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_ranks_other_than_0_run_beside_the_lock_rank_0_holds(make_cfg, monkeypatch):
    cfg = make_cfg()
    with finetune.output_dir_lock(cfg.output_dir, hold=True):
        monkeypatch.setenv("RANK", "1")
        with finetune.prepared_run(cfg) as run:
            assert len(run.data.train) > 0


def test_publishing_a_result_replaces_the_earlier_one_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("log\n")
    finetune.publish_result(out, lambda f: [(f / n).write_text(n) for n in ("model.safetensors", "config.json")],
                            kept=["metrics.jsonl"])
    finetune.publish_result(out, lambda f: [(f / n).write_text(n + "2") for n in ("adapter_model.safetensors",)],
                            kept=["metrics.jsonl"])
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", "metrics.jsonl", "result.json"]
    assert json.loads((out / "result.json").read_text())["files"] == ["adapter_model.safetensors", "metrics.jsonl"]


def test_secrets_never_reach_any_output_file(make_cfg, tmp_path, cli):
    token, key = "hf_PLANTEDtoken1234567890abcdef", "PLANTEDwandbkey0123456789abcdef01234567"
    cfg = make_cfg(output_dir=str(tmp_path / "run"), max_steps=2, report_to="all", merge_adapter=True,
                   save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1, validation_split=0.25)
    env = {"HF_TOKEN": token, "WANDB_API_KEY": key, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"),
           "WANDB_SILENT": "true"}
    result = cli("--config", str(config_file(tmp_path / "run.yml", cfg)), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    files = [p for p in [*(tmp_path / "run").rglob("*"), *(tmp_path / "wb").rglob("*")] if p.is_file()]
    assert len(files) > 20 and any(p.suffix == ".wandb" for p in files)
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))  # the metrics reached tensorboard too
    for path in files:
        data = path.read_bytes()
        assert token.encode() not in data and key.encode() not in data, path
    assert token not in result.stdout + result.stderr and key not in result.stdout + result.stderr
