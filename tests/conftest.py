"""Shared fixtures: a tiny random-weight Llama with the embedded model's real tokenizer, small real data files on
disk, a Config factory pointing at them, and finished runs trained once per session for the tests that read them."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import finetune
from helpers import DEMO_TEST, DEMO_TRAIN, EMBEDDED, FAST, ROOT, run_cli, write_jsonl


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs on the embedded model or of the CLI (still run in CI)")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # each test process, and the runs it starts, compute on its share of the cores, not on all of them
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # Library warnings with nothing to act on (finetune.py silences the first two at import, but pytest resets warning
    # filters for every test).
    for message in ("MatMul8bitLt", "`is_gradient_checkpointing` is deprecated",
                    "`torch.jit.script_method` is deprecated"):
        config.addinivalue_line("filterwarnings", f"ignore:{message}")


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    if not (EMBEDDED / "model.safetensors").exists():
        pytest.fail(f"{EMBEDDED} is missing: run ./setup.sh first")
    return EMBEDDED


@pytest.fixture(scope="session")
def test_models() -> Path:
    """models/ with what only the tests use, Gemma 3 270M and llama.cpp's vocabulary files, and llama.cpp's build:
    prepared by ./setup.sh --test-models when missing (once per machine: it keeps them in ~/.cache/finetune-py)."""
    import fcntl

    models = ROOT / "models"
    with (ROOT / ".venv" / "test-models.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other test process waits for them rather than preparing them twice
        if not ((models / "gemma-3-270m" / "model.safetensors").exists()
                and (models / "vocab" / "ggml-vocab-phi-3.gguf").exists()
                and (finetune.llama_cpp_home() / "bin" / "llama-quantize").exists()):
            done = subprocess.run(["bash", str(ROOT / "setup.sh"), "--test-models"], capture_output=True, text=True)
            if done.returncode:
                pytest.fail(f"./setup.sh --test-models failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return models


@pytest.fixture(scope="session")
def gemma_model(test_models) -> Path:
    return ROOT / finetune.SECOND_MODEL


def tiny_llama(out: Path, tokenizer_dir: Path, **changes) -> Path:
    """A 2-layer Llama with random weights (seeded), SmolLM2's tokenizer and chat template: trains in milliseconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                    tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**settings, **changes})).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, embedded_model) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), embedded_model)


@pytest.fixture(scope="session")
def pc_rows() -> list[dict]:
    """The first 48 rows of the shipped demo data: real prompt/completion rows."""
    return [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:48]]


@pytest.fixture
def pc_file(tmp_path, pc_rows) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", pc_rows)


@pytest.fixture
def chat_file(tmp_path, pc_rows) -> Path:
    rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"].strip()}]} for r in pc_rows]
    return write_jsonl(tmp_path / "chat.jsonl", rows)


@pytest.fixture
def make_cfg(tmp_path, tiny_model, pc_file):
    """Config for a fast run of the tiny model on pc_file; keyword arguments override any key."""

    def make(**overrides) -> finetune.Config:
        values = dict(model_name=str(tiny_model), dataset_name=str(pc_file), output_dir=str(tmp_path / "out"), **FAST)
        return finetune.Config(**{**values, **overrides})

    return make


@pytest.fixture
def cli():
    return run_cli


# The modules by the time they take, longest first. Each test process takes a whole module (pytest.ini: loadscope)
# as it frees up; xdist would otherwise start the modules with the most tests first, which left the few long whole
# runs (end-to-end, memory estimates, Gemma) for the end, one process busy with them and the other idle.
LONGEST_FIRST = ["test_safety.py", "test_export.py", "test_estimate.py", "test_end_to_end.py", "test_preference.py",
                 "test_gemma.py", "test_distributed.py", "test_bad_inputs.py", "test_recipes.py", "test_model.py",
                 "test_data.py", "test_commands.py", "test_train.py", "test_save.py", "test_run.py", "test_evaluate.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: each module's order is kept


# The shipped config.yml, shortened to a few minutes' worth of the default job: what test_end_to_end checks.
SHORT_DEMO = ("max_steps=16", "eval_strategy=no", "save_steps=8", "eval_max_examples=20")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, embedded_model) -> tuple[Path, str]:
    """The default job (config.yml, SHORT_DEMO) run once as a user runs it, in its own process: (output_dir, stdout)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run_cli("--config", str(ROOT / "config.yml"), f"output_dir={out}", *SHORT_DEMO)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result.stdout


def trained_run(folder: Path, tiny_model: Path, data: Path, **overrides) -> tuple[finetune.Config, Path]:
    """A short run of the tiny model with validation, three test rows scored before and after, and an adapter big
    enough to change the model's answers: (its config, its output_dir)."""
    test_file = write_jsonl(folder / "test.jsonl", [json.loads(r) for r in DEMO_TEST.read_text().splitlines()[:3]])
    values = dict(FAST, model_name=str(tiny_model), dataset_name=str(data), output_dir=str(folder / "run"),
                  learning_rate=5e-2, eval_strategy="steps", eval_steps=2, validation_split=0.25,
                  test_dataset=str(test_file), eval_before=True, peft_lora_alpha=64)
    cfg = finetune.Config(**{**values, **overrides})
    return cfg, finetune.run_training(cfg)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_model, pc_rows):
    """One LoRA run in chat format, trained once for the session. Read it; copy it (run_copy) to change it."""
    folder = tmp_path_factory.mktemp("finished")
    return trained_run(folder, tiny_model, write_jsonl(folder / "train.jsonl", pc_rows))


@pytest.fixture(scope="session")
def raw_run(tmp_path_factory, tiny_model, pc_rows):
    """The same run in raw prompt format."""
    folder = tmp_path_factory.mktemp("raw")
    return trained_run(folder, tiny_model, write_jsonl(folder / "train.jsonl", pc_rows), prompt_format="raw")


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, tiny_model, pc_rows):
    """A full fine-tune of the tiny model."""
    folder = tmp_path_factory.mktemp("full")
    return trained_run(folder, tiny_model, write_jsonl(folder / "train.jsonl", pc_rows), use_peft=False,
                       learning_rate=1e-3)


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of finished_run's output folder, for tests that change it."""
    cfg, out = finished_run
    return cfg, Path(shutil.copytree(out, tmp_path / "run-copy"))


@pytest.fixture
def overfitting(make_cfg, tmp_path):
    """A run whose validation rows answer "beta gamma" where every training row answers "alpha delta": validation loss
    falls while the model learns the shared end of an answer, then climbs as it learns the training answer."""
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"Word number {i}:", "completion": " alpha delta"} for i in range(40)]

    def make(**overrides):
        cfg = make_cfg(**{**dict(dataset_name=str(data), use_peft=False, learning_rate=1e-2, validation_split=0.25,
                                 eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, batch_size=4,
                                 max_steps=30, prompt_format="raw"), **overrides})
        write_jsonl(data, rows)
        held_out = set(finetune.load_sources(cfg)[0].validation[finetune.ROW])  # the split depends on the seed alone
        write_jsonl(data, [dict(r, completion=" beta gamma") if i + 1 in held_out else r for i, r in enumerate(rows)])
        return cfg

    return make
