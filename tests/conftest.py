"""Shared fixtures: a tiny random-weight Llama with the embedded model's real tokenizer, small real data files on
disk, a Config factory pointing at them, and a helper that runs the CLI in a subprocess."""

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import annotated_types
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402

EMBEDDED = ROOT / finetune.EMBEDDED_MODEL
DEMO_TRAIN = ROOT / "data" / "demo_train.jsonl"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs on the embedded model (still run in CI)")


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    if not (EMBEDDED / "model.safetensors").exists():
        pytest.fail(f"{EMBEDDED} is missing: run ./setup.sh first")
    return EMBEDDED


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, embedded_model) -> Path:
    """A 2-layer Llama with random weights (seeded) and SmolLM2's tokenizer and chat template: trains in milliseconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def pc_rows() -> list[dict]:
    """The first 48 rows of the shipped demo data: real prompt/completion rows."""
    return [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:48]]


@pytest.fixture
def pc_file(tmp_path, pc_rows) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", pc_rows)


@pytest.fixture
def chat_file(tmp_path, pc_rows) -> Path:
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"].strip()}]}
            for r in pc_rows]
    return write_jsonl(tmp_path / "chat.jsonl", rows)


@pytest.fixture
def make_cfg(tmp_path, tiny_model, pc_file):
    """Config for a fast run of the tiny model on pc_file; keyword arguments override any key."""

    def make(**overrides) -> finetune.Config:
        values = dict(model_name=str(tiny_model), dataset_name=str(pc_file), test_dataset=None,
                      output_dir=str(tmp_path / "out"), max_steps=4, batch_size=4, logging_steps=1,
                      eval_strategy="no", save_strategy="no", eval_before=False, learning_rate=1e-3,
                      eval_max_new_tokens=8, precision="fp32")
        values.update(overrides)
        return finetune.Config(**values)

    return make


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """python finetune.py ARGS in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def numeric_fields() -> dict[str, typing.Any]:
    """Schema fields whose type is int or float (optionally None), read from Config."""
    found = {}
    for name, field in finetune.Config.model_fields.items():
        types = set(typing.get_args(field.annotation) or [field.annotation]) - {type(None)}
        if types and types <= {int, float}:
            found[name] = field
    return found


def out_of_range_values(field) -> list:
    """One value past each bound the schema declares for the field."""
    values = []
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            values.append(bound.ge - 1)
        elif isinstance(bound, annotated_types.Gt):
            values.append(bound.gt)
        elif isinstance(bound, annotated_types.Le):
            values.append(bound.le + 1)
        elif isinstance(bound, annotated_types.Lt):
            values.append(bound.lt)
    return values
