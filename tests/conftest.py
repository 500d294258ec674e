"""Shared fixtures: a tiny random-weight Llama with the embedded model's real tokenizer, small real data files on
disk, a Config factory pointing at them, and finished runs trained once per session for the tests that read them."""

import json
import shutil
from pathlib import Path

import pytest

import finetune
from helpers import DEMO_TEST, DEMO_TRAIN, EMBEDDED, FAST, ROOT, run_cli, write_jsonl


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs on the embedded model or of the CLI (still run in CI)")
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
def gemma_model() -> Path:
    path = ROOT / finetune.SECOND_MODEL
    if not (path / "model.safetensors").exists():
        pytest.fail(f"{path} is missing: run ./setup.sh first")
    return path


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
