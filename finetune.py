"""finetune.py: fine-tune a causal LLM (LoRA, QLoRA or full) from one config.yml.

    python finetune.py                      # train with ./config.yml
    python finetune.py --config my.yml batch_size=4 max_steps=100
    python finetune.py --validate           # check config, data and model source; train nothing
    python finetune.py --estimate 24GiB     # expected peak memory, and what fits a budget
    python finetune.py eval | generate | merge | push   # use a finished run (see --help)

The file reads top to bottom like the pipeline: schema -> data -> model -> train -> evaluate -> save/push -> using a
finished run -> memory estimate -> the run end to end -> CLI.
Heavy libraries (torch, transformers, trl, peft, datasets) are imported inside the functions that need them, so that
`--help` and config validation answer at once.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


# Third-party noise with nothing for our users to act on: bitsandbytes' optional Hub kernel (out of reach offline) and
# 8-bit matmuls announcing their input casts.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft 0.21 on transformers 5


class UserError(Exception):
    """A mistake in the user's config, data or environment: printed as one line, exit status 2, no traceback."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; exits 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# ---------------------------------------------------------------------------------------------------------------------
# Schema: every option, its type, default and one-line description. config.yml documents the same keys in this order.
# ---------------------------------------------------------------------------------------------------------------------

OPTIMIZERS = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_bnb_8bit", "paged_adamw_8bit",
                     "paged_adamw_32bit", "lion_8bit"]
SCHEDULERS = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                     "inverse_sqrt"]
EMBEDDED_MODEL = "models/SmolLM2-135M-Instruct"


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    # model
    model_name: str = Field(EMBEDDED_MODEL, description="Hub id, local model folder or local .gguf file to fine-tune.")
    trust_remote_code: bool = Field(False, description="Run Python code shipped in the model repository (only for repositories you trust).")
    use_auth_token: bool = Field(False, description="Send HF_TOKEN from the environment when downloading models and datasets.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="Compute precision: auto picks bf16 where the hardware supports it, else fp16 on GPU, else fp32.")
    load_in_8bit: bool = Field(False, description="Load the base model in 8-bit with bitsandbytes (LoRA on top; needs use_peft).")
    load_in_4bit: bool = Field(False, description="Load the base model in 4-bit with bitsandbytes, i.e. QLoRA (needs use_peft).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (normal float, the QLoRA default) or fp4.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Also quantize the 4-bit quantization constants (saves ~0.4 bit per parameter).")
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Dtype the 4-bit layers compute in; auto follows precision.")
    use_peft: bool = Field(True, description="Train LoRA adapters (PEFT) instead of all weights.")
    peft_lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank (seed 004 uses 32).")
    peft_lora_alpha: int = Field(32, ge=1, description="LoRA scale numerator: updates are scaled by alpha / r (seed 004 uses 16).")
    peft_lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input (seed 004 uses 0.05; any dropout costs ~20% speed on CPU).")
    peft_target_modules: Literal["all-linear"] | list[str] = Field("all-linear", description="Modules that get LoRA adapters: all-linear, or a list of names such as [q_proj, v_proj].")

    # data
    dataset_name: str = Field("data/demo_train.jsonl", description="Hub dataset id, or a local .jsonl/.json/.csv/.parquet file or folder of them.")
    dataset_config: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    dataset_split: str = Field("train", description="Split of the dataset to train on.")
    dataset_text_field: str = Field("text", description="Column with plain text, for datasets without prompt/completion or messages.")
    prompt_field: str = Field("prompt", description="Column with the prompt, for prompt/completion datasets.")
    completion_field: str = Field("completion", description="Column with the expected completion, for prompt/completion datasets.")
    messages_field: str = Field("messages", description="Column with chat messages ([{role, content}, ...]), rendered with the tokenizer's chat template.")
    validation_split: float = Field(0.1, ge=0, le=0.5, description="Fraction of the training rows held out for validation loss (0 = no validation).")
    test_dataset: str | None = Field("data/demo_test.jsonl", description="Held-out prompt/completion file scored by generation; null = use the validation rows.")
    seq_length: int = Field(512, ge=8, le=1_048_576, description="Maximum tokens per example.")
    long_examples: Literal["truncate", "drop"] = Field("truncate", description="What to do with examples longer than seq_length: truncate (keep the start) or drop; the count is reported.")
    prompt_loss_weight: float = Field(0.0, ge=0, le=1, description="Weight of prompt tokens in the loss relative to completion tokens (0 = completion only, 1 = all alike).")

    # training
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate of the optimizer.")
    batch_size: int = Field(8, ge=1, le=65_536, description="Examples per forward/backward pass (per device).")
    gradient_accumulation_steps: int = Field(1, ge=1, le=65_536, description="Passes whose gradients are summed before each optimizer step.")
    num_train_epochs: float = Field(3.0, ge=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to train; -1 = use num_train_epochs.")
    lr_scheduler_type: SCHEDULERS = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the steps spent warming the learning rate up from 0.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Decoupled weight decay of the optimizer.")
    optim: OPTIMIZERS = Field("adamw_torch", description="Optimizer (the *_8bit ones need bitsandbytes).")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0 = no clipping).")
    seed: int = Field(42, ge=0, description="Random seed for LoRA init, data split and data order.")
    gradient_checkpointing: bool | Literal["auto"] = Field("auto", description="Recompute activations in backward to save memory; auto turns it on only when the estimate does not fit.")
    gradient_checkpointing_kwargs: dict[str, Any] = Field({"use_reentrant": False}, description="Keyword arguments for torch.utils.checkpoint.")

    # evaluation, logging, checkpoints
    eval_strategy: Literal["steps", "epoch", "no"] = Field("steps", description="When to compute validation loss and token accuracy.")
    eval_steps: int | None = Field(None, ge=1, description="Steps between evaluations with eval_strategy: steps (null = logging_steps).")
    eval_before: bool = Field(True, description="Also score the base model on the test rows before training, for the base vs fine-tuned table.")
    eval_max_new_tokens: int = Field(64, ge=1, le=4096, description="Tokens to generate per test prompt when scoring.")
    logging_steps: int = Field(10, ge=1, description="Steps between log lines (loss, learning rate, grad norm, tokens per second).")
    save_strategy: Literal["steps", "epoch", "no"] = Field("steps", description="When to write a resumable checkpoint.")
    save_steps: int = Field(100, ge=1, description="Steps between checkpoints with save_strategy: steps.")
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints to keep; older ones are deleted (null = keep all).")
    report_to: Literal["none", "wandb", "tensorboard", "all"] = Field("none", description="Where to send metrics besides the console and metrics.jsonl.")
    run_name: str | None = Field(None, description="Run name shown in wandb / tensorboard (default: the output folder name).")

    # output
    output_dir: str = Field("output", description="Folder for checkpoints and the final model (in <output_dir>/final).")
    overwrite_output_dir: bool = Field(False, description="Allow starting a new run in an output_dir that holds another run's results (deletes them).")
    resume_from_checkpoint: str | None = Field(None, description="Continue a run: auto (newest checkpoint in output_dir) or a checkpoint folder.")
    push_to_hub: bool = Field(False, description="Upload the final model to the Hugging Face Hub (token from HF_TOKEN).")
    hub_model_id: str | None = Field(None, description="Hub repository to push to, as user/name.")
    hub_private_repo: bool = Field(True, description="Create the Hub repository as private.")
    fsdp: bool = Field(False, description="Shard weights, gradients and optimizer states across processes with FSDP (options in fsdp_config).")
    fsdp_config: dict[str, Any] | None = Field(None, description="FSDP options passed to the HF Trainer, e.g. {transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}.")
    deepspeed: str | None = Field(None, description="DeepSpeed ZeRO config file (json) passed to the HF Trainer; needs the deepspeed package.")
    merge_adapter: bool = Field(False, description="After training, also write <output_dir>/merged: the adapter merged into a 16-bit copy of the base.")

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, values):
        # pydantic reads true as 1 for numbers; in a config that is always a slip, e.g. `learning_rate: yes`
        if isinstance(values, dict):
            for key, value in values.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and {int, float} & set(getattr(field.annotation, "__args__", (field.annotation,))):
                    raise ValueError(f"{key}: expected a number, got {value!r}")
        return values

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    @model_validator(mode="after")
    def _no_contradictions(self) -> Config:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both true: pick one")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError("a quantized model can only be trained with LoRA: set use_peft: true, or turn off load_in_4bit/load_in_8bit")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("nothing to train: set num_train_epochs > 0 or max_steps > 0")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (user/name)")
        if self.eval_strategy != "no" and self.validation_split == 0:
            raise ValueError("eval_strategy needs validation rows: set validation_split > 0 or eval_strategy: no")
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise ValueError("resume_from_checkpoint and overwrite_output_dir contradict each other: pick one")
        if self.fsdp and self.deepspeed:
            raise ValueError("fsdp and deepspeed are both set: pick one")
        if isinstance(self.peft_target_modules, list) and not self.peft_target_modules:
            raise ValueError("peft_target_modules is empty: use all-linear or name at least one module")
        return self


def parse_override(arg: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as YAML, so 3 is an int and [a, b] a list."""
    if "=" not in arg:
        raise UserError(f"unexpected argument {arg!r}: overrides are key=value, e.g. batch_size=4")
    key, _, raw = arg.partition("=")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return key.strip(), raw


def check_keys(keys, where: str) -> None:
    for key in keys:
        if key not in Config.model_fields:
            close = difflib.get_close_matches(str(key), Config.model_fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else " (see python finetune.py --help for the keys)"
            raise UserError(f"{where}: unknown key {key!r}{hint}")


def describe_validation_error(err: ValidationError, where: str, overridden: set[str] = frozenset()) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] not in ("value_error", "extra_forbidden", "missing"):
        msg = f"{msg} (got {first.get('input')!r})"
    where = "command line" if key.split(".")[0] in overridden else where
    return f"{where}: {key}: {msg}" if key else f"{where}: {msg}"


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """config.yml plus key=value overrides, validated; any mistake is a UserError naming the key or line."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if file.is_dir():
            raise UserError(f"--config {path} is a folder; pass the path of a YAML file")
        if not file.is_file():
            raise UserError(f"config file not found: {path} (pass --config PATH, or copy config.yml from the repository)")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}:{line} is not valid YAML ({getattr(e, 'problem', None) or e}); fix the syntax") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"{path}: must be a mapping of key: value lines, got a {type(loaded).__name__}")
        data = loaded or {}
        check_keys(data, path)
    overridden = set()
    for arg in overrides:
        key, value = parse_override(arg)
        check_keys([key], "command line")
        data[key] = value
        overridden.add(key)
    try:
        return Config(**data)
    except ValidationError as e:
        raise UserError(describe_validation_error(e, path or "config", overridden)) from None


def config_help() -> str:
    lines = ["config keys (set in config.yml or as key=value):"]
    for name, field in Config.model_fields.items():
        lines.append(f"  {name} (default {field.default!r}): {field.description}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Data: load rows from a file, folder or Hub id, find their format, tokenize with per-token loss weights.
# ---------------------------------------------------------------------------------------------------------------------

DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def local_data_files(name: str) -> list[Path] | None:
    """The data files behind a local path, or None when `name` is not a local path (then it is a Hub id)."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix not in DATA_BUILDERS:
            raise UserError(f"dataset {name}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_BUILDERS)
        odd = next((p for p in files if not p.is_file()), None)
        if odd is not None:  # a folder or dead link named like data: skipping it would silently drop rows
            raise UserError(f"dataset folder {name}: {odd.name} is not a readable file; move it out or fix it")
        if not files:
            raise UserError(f"dataset folder {name} holds no .jsonl/.json/.csv/.parquet file")
        if len({DATA_BUILDERS[p.suffix] for p in files}) > 1:
            raise UserError(f"dataset folder {name} mixes file types; keep one of .jsonl/.json, .csv or .parquet")
        return files
    if name.startswith((".", "/", "~")) or Path(name).suffix in DATA_BUILDERS or name.count("/") > 1:
        raise UserError(f"dataset not found: {name} (no such file or folder)")
    return None


def check_json_lines(path: Path, text_fields: tuple[str, ...] = ()) -> None:
    """datasets' JSON errors name neither file nor line, and a column of mixed types gets JSON-parsed into objects;
    this scan (constant memory) names the line of a broken row or of a text field that is not text."""
    rows = 0
    try:
        f = path.open("rb")
    except OSError as e:
        raise UserError(f"dataset file {path}: cannot open it ({e.strerror})") from None
    with f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{number}: not UTF-8 (byte {e.start} of the line); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            for field in text_fields:
                if field in row and not isinstance(row[field], str):
                    raise UserError(f"{path}:{number}: {field!r} is {type(row[field]).__name__}, expected text")
            rows += 1
    if rows == 0:
        raise UserError(f"dataset file {path} is empty: no rows")


def read_rows(name: str, config_name: str | None = None, split: str = "train", token: bool = False,
              text_fields: tuple[str, ...] = ()):
    """One datasets.Dataset of raw rows from a local path or the Hub."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)  # its own "Failed to read ..." lines would precede our one-line error
    files = local_data_files(name)
    if files is None:
        try:
            return datasets.load_dataset(name, config_name, split=split, token=token)
        except Exception as e:  # offline, private, misspelled: all reach the user as one line
            raise UserError(f"dataset {name!r}: cannot load it from the Hub ({first_line(e)}); check the id, network and HF_TOKEN") from None
    for file in files:
        if file.stat().st_size == 0:
            raise UserError(f"dataset file {file} is empty: no rows")
        if file.suffix == ".jsonl":
            check_json_lines(file, text_fields)
    try:
        rows = datasets.load_dataset(DATA_BUILDERS[files[0].suffix], data_files=[str(f) for f in files], split="train")
    except Exception as e:
        message = first_line(e.__cause__ or e)  # datasets wraps the parser's own reason ("Expected 2 fields in line 9")
        if "corresponds to no data" in message:
            raise UserError(f"dataset {name} is empty: no rows") from None
        kind = {"json": "JSON", "csv": "CSV", "parquet": "Parquet"}[DATA_BUILDERS[files[0].suffix]]
        raise UserError(f"dataset {name}: cannot read it as {kind} ({message})") from None
    return rows


def first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def data_format(columns: list[str], cfg: Config, where: str) -> str:
    if cfg.messages_field in columns:
        return "messages"
    if cfg.prompt_field in columns and cfg.completion_field in columns:
        return "prompt_completion"
    if cfg.dataset_text_field in columns:
        return "text"
    raise UserError(
        f"dataset {where}: rows have fields {sorted(c for c in columns if c != ROW)}, but training needs {cfg.prompt_field!r} + {cfg.completion_field!r}, "
        f"{cfg.messages_field!r} or {cfg.dataset_text_field!r}; rename the fields or set prompt_field/completion_field/"
        f"messages_field/dataset_text_field")


def field_text(row: dict, field: str, number: int, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise UserError(f"dataset {where}: row {number}: {field!r} is {type(value).__name__}, expected text")
    return value


def chat_spans(tokenizer, messages: list, number: int, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant replies in it."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise UserError(f"dataset {where}: row {number}: messages must be a list of {{role, content}} objects with text content")
    if messages and messages[0]["role"] == "assistant":
        raise UserError(f"dataset {where}: row {number}: the conversation starts with an assistant message; start it with a system or user message")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"dataset {where}: chat messages need a tokenizer with a chat template; this model has none (use prompt/completion rows)")
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    full, spans = render(messages), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], gen=True)), len(render(messages[: i + 1]))
        spans.append((start, end))
    if not spans:
        raise UserError(f"dataset {where}: row {number}: no assistant message to learn from")
    return full, spans


def tokenize_row(row: dict, number: int, tokenizer, fmt: str, cfg: Config, where: str) -> dict:
    """input_ids and the loss weight of each token: 1 for what the model should learn to write, prompt_loss_weight
    for the prompt. Prompt and completion are tokenized apart, as generation from the raw prompt will see them."""
    eos = [tokenizer.eos_token_id]
    plw = cfg.prompt_loss_weight
    if fmt == "text":
        ids = tokenizer(field_text(row, cfg.dataset_text_field, number, where))["input_ids"] + eos
        weights = [1.0] * len(ids)
    elif fmt == "prompt_completion":
        prompt = tokenizer(field_text(row, cfg.prompt_field, number, where))["input_ids"]
        completion = tokenizer(field_text(row, cfg.completion_field, number, where), add_special_tokens=False)["input_ids"] + eos
        ids, weights = prompt + completion, [plw] * len(prompt) + [1.0] * len(completion)
    else:
        text, spans = chat_spans(tokenizer, row.get(cfg.messages_field), number, where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        weights = [1.0 if any(s <= start < e for s, e in spans) else plw for start, _ in enc["offset_mapping"]]
    return {"input_ids": ids, "loss_weights": weights, "length": len(ids)}


def tokenize_dataset(rows, tokenizer, cfg: Config, where: str):
    """Tokenized rows, cut to seq_length (or dropped, per long_examples); returns (dataset, number of long rows)."""
    fmt = data_format(rows.column_names, cfg, where)
    # Explicit fingerprints: datasets would otherwise try to pickle the config inside each lambda to name the cache.
    key = hashlib.sha256(f"{rows._fingerprint}|{cfg.model_dump_json()}|{tokenizer.name_or_path}|{len(tokenizer)}|"
                         f"{getattr(tokenizer, 'chat_template', None)}".encode()).hexdigest()[:24]
    tokenized = rows.map(lambda row, i: tokenize_row(row, row.get(ROW, i + 1), tokenizer, fmt, cfg, where),
                         with_indices=True, remove_columns=rows.column_names, new_fingerprint=f"{key}-tokenize")
    too_long = sum(n > cfg.seq_length for n in tokenized["length"])  # `length` stays the length before any cut
    cut = cfg.seq_length
    if too_long and cfg.long_examples == "drop":
        tokenized = tokenized.filter(lambda n: n <= cut, input_columns="length", new_fingerprint=f"{key}-drop")
    elif too_long:
        tokenized = tokenized.map(lambda r: {"input_ids": r["input_ids"][:cut], "loss_weights": r["loss_weights"][:cut]},
                                  new_fingerprint=f"{key}-truncate")
    before = len(tokenized)
    tokenized = tokenized.filter(lambda w: max(w[1:], default=0) > 0, input_columns="loss_weights",
                                 new_fingerprint=f"{key}-trainable")
    if len(tokenized) < before:
        print(f"dataset {where}: {before - len(tokenized)} examples had no token to learn from within seq_length={cfg.seq_length} and were dropped")
    if len(tokenized) == 0:
        raise UserError(f"dataset {where}: no example left with a token to learn from (check seq_length, long_examples and the fields)")
    return tokenized, too_long


ROW = "__row__"


def text_fields(cfg: Config) -> tuple[str, ...]:
    return cfg.prompt_field, cfg.completion_field, cfg.dataset_text_field


def load_dataset_splits(cfg: Config):
    """(train rows, validation rows or None), raw and untokenized, split with the config's seed."""
    rows = read_rows(cfg.dataset_name, cfg.dataset_config, cfg.dataset_split, token=hub_token(cfg),
                     text_fields=text_fields(cfg))
    if len(rows) == 0:
        raise UserError(f"dataset {cfg.dataset_name} is empty: no rows")
    rows = rows.add_column(ROW, list(range(1, len(rows) + 1)))  # errors name the row in the file, not in the split
    data_format(rows.column_names, cfg, cfg.dataset_name)
    if cfg.validation_split == 0:
        return rows, None
    n_val = max(1, round(len(rows) * cfg.validation_split))
    if n_val >= len(rows):
        raise UserError(f"dataset {cfg.dataset_name} has {len(rows)} rows: too few to hold out validation_split={cfg.validation_split}; add rows or set validation_split: 0")
    split = rows.train_test_split(test_size=n_val, seed=cfg.seed)
    return split["train"], split["test"]


def load_test_rows(cfg: Config, val_rows):
    """Rows scored by generation: test_dataset if set, else the validation rows."""
    if cfg.test_dataset:
        return read_rows(cfg.test_dataset, text_fields=text_fields(cfg))
    return val_rows


def test_pairs(rows, tokenizer, cfg: Config) -> list[tuple[str, str]]:
    """(prompt as the model sees it, reference answer) for each test row; plain-text rows have no answer to score."""
    if rows is None or len(rows) == 0:
        return []
    fmt = data_format(rows.column_names, cfg, cfg.test_dataset or cfg.dataset_name)
    if fmt == "prompt_completion":
        return [(r[cfg.prompt_field], r[cfg.completion_field]) for r in rows]
    if fmt == "messages":
        pairs = []
        for number, r in enumerate(rows, 1):
            msgs = r[cfg.messages_field]
            replies = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            if not replies:
                raise UserError(f"test rows {cfg.test_dataset or cfg.dataset_name}: row {number} has no assistant message to score against")
            last = replies[-1]
            prompt = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
            pairs.append((prompt, msgs[last]["content"]))
        return pairs
    return []


# ---------------------------------------------------------------------------------------------------------------------
# Model: tokenizer, base model (full precision, 8-bit or 4-bit), LoRA adapters.
# ---------------------------------------------------------------------------------------------------------------------

def model_source(name: str) -> tuple[str, dict]:
    """(folder or Hub id, extra from_pretrained kwargs); a .gguf file loads from its folder."""
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model_name: GGUF file not found: {name}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.parent.is_dir() and str(path.parent) != ".":
        raise UserError(f"model_name: folder not found: {name}" + (" (run ./setup.sh to prepare the embedded model)" if name == EMBEDDED_MODEL else ""))
    return name, {}


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """bf16 pays on CPUs with AVX512-BF16 or AMX; elsewhere it is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(cfg: Config, device: str) -> str:
    import torch

    if cfg.precision == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if cfg.precision == "fp16" and device != "cuda":
        raise UserError("precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return cfg.precision


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def hub_token(cfg: Config) -> bool:
    """True sends HF_TOKEN (or the stored login); False sends nothing, where None would send it anyway."""
    return cfg.use_auth_token


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    source, extra = model_source(cfg.model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, token=hub_token(cfg), **extra)
    except Exception as e:
        raise UserError(f"model_name {cfg.model_name!r}: cannot load its tokenizer ({first_line(e)}); "
                        f"run ./setup.sh for the embedded model, or check the id/path and network") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"model_name {cfg.model_name!r}: the tokenizer has no EOS token, so completions could not end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss; any id works
    return tokenizer


def register_varlen_attention() -> str:
    """Causal attention run per sequence on padding-free rows (cu_seq_lens from the collator), in fp32: on this kind of
    CPU the flash kernel is ~2x faster in fp32 than bf16, and no T x T mask is built. Other calls (generation with a
    padding mask) fall through to plain SDPA."""
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    @torch.compiler.disable
    def varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None or query.shape[0] != 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        bounds = cu.tolist()
        with torch.autocast(query.device.type, enabled=False):
            q, k, v = query.float(), key.float(), value.float()
            out = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                  scale=scaling, enable_gqa=True) for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(out, 2).to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register("varlen_sdpa", varlen_sdpa)
    AttentionMaskInterface.register("varlen_sdpa", sdpa_mask)
    return "varlen_sdpa"


def quantization_config(cfg: Config, precision: str):
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if cfg.load_in_4bit:
        compute = precision if cfg.bnb_4bit_compute_dtype == "auto" else {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[cfg.bnb_4bit_compute_dtype]
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                                  bnb_4bit_compute_dtype=torch_dtype(compute))
    return None


def load_base_model(cfg: Config, precision: str, device: str, attn: str | None, quantize: bool = True):
    """The pretrained model. Full fine-tunes keep fp32 master weights (autocast does the bf16 math); frozen bases are
    stored in the compute precision, which halves memory and skips a cast in every matmul."""
    from transformers import AutoModelForCausalLM

    source, extra = model_source(cfg.model_name)
    quant = quantization_config(cfg, precision) if quantize else None
    dtype = torch_dtype(precision if (cfg.use_peft or precision == "fp32") else "fp32")
    if cfg.trust_remote_code:
        print(f"warning: trust_remote_code is on: Python code from {cfg.model_name} will run on this machine", file=sys.stderr)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, token=hub_token(cfg), quantization_config=quant, **extra)
    if attn:
        kwargs["attn_implementation"] = attn
    if device == "cuda" and quant is not None:
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as e:
        raise UserError(f"model_name {cfg.model_name!r}: cannot load the model ({first_line(e)}); "
                        f"run ./setup.sh for the embedded model, or check the id/path and network") from None
    if "gguf_file" in extra:
        model = plain_copy(model)
    return model


def plain_copy(model):
    """A model loaded from GGUF carries a gguf quantization tag that blocks save_pretrained; a fresh model built from
    its config with its (dequantized) weights saves and trains like any other."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype, attn_implementation=config._attn_implementation)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    return fresh


def add_lora(model, cfg: Config, precision: str, gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from peft.tuners.tuners_utils import BaseTunerLayer

    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs)
    lora = LoraConfig(r=cfg.peft_lora_r, lora_alpha=cfg.peft_lora_alpha, lora_dropout=cfg.peft_lora_dropout,
                      target_modules=cfg.peft_target_modules, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise UserError(f"peft_target_modules: {first_line(e)}") from None
    if precision != "fp32" and not quantized:
        # Autocast already runs the adapter matmuls in half precision; PEFT's own cast of each input to the fp32
        # adapter dtype is a wasted pass over every activation.
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model


def build_model(cfg: Config, precision: str, device: str, gradient_checkpointing: bool = False):
    """The model to train: the base in the configured precision/quantization, with LoRA adapters when use_peft."""
    attn = register_varlen_attention() if device == "cpu" else None
    model = load_base_model(cfg, precision, device, attn)
    if cfg.use_peft:
        model = add_lora(model, cfg, precision, gradient_checkpointing)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the parameters they stand for."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# ---------------------------------------------------------------------------------------------------------------------
# Train: a collator with per-token loss weights, a fused LM head + weighted cross-entropy, TRL's SFTTrainer around it.
# ---------------------------------------------------------------------------------------------------------------------

def collate(examples: list[dict], pad_id: int, padding_free: bool) -> dict:
    """A batch with `loss_weights` (0 = not trained) next to the usual inputs. Padding-free batches are one row of
    concatenated examples whose positions restart at each example; the attention keeps examples apart."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    ids = [torch.tensor(e["input_ids"], dtype=torch.long) for e in examples]
    weights = [torch.tensor(e["loss_weights"], dtype=torch.float32) for e in examples]
    if padding_free:
        lengths = torch.tensor([len(x) for x in ids])
        batch = {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
        weights = torch.cat(weights)[None]
        weights[batch["position_ids"] == 0] = 0  # the first token of an example is never predicted from the one before
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(lengths.max()), max_length_k=int(lengths.max()))
    else:
        batch = {"input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),
                 "attention_mask": pad_sequence([torch.ones_like(x) for x in ids], batch_first=True)}
        weights = pad_sequence(weights, batch_first=True)
    batch["loss_weights"] = weights
    batch["labels"] = batch["input_ids"].masked_fill(weights == 0, -100)
    return batch


def fused_linear_cross_entropy():
    """An autograd function: sum_i w_i * CE(h_i @ W^T, y_i) / denom, computed in row chunks so that the [tokens x vocab]
    logits never exist whole; the gradients are formed in the forward, which keeps nothing vocab-sized for backward."""
    import torch

    class FusedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, token_weights, denom, compute_dtype, training):
            w = weight.to(compute_dtype)
            grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if training else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if training and weight.requires_grad else None
            loss = hidden.new_zeros((), dtype=torch.float32)
            correct = hidden.new_zeros((), dtype=torch.long)
            chunk = max(1, 2**25 // weight.shape[0])  # ~128 MB of fp32 logits per chunk
            for s in range(0, hidden.shape[0], chunk):
                h, y, tw = hidden[s:s + chunk].to(compute_dtype), targets[s:s + chunk], token_weights[s:s + chunk]
                z = (h @ w.t()).float()
                lse = torch.logsumexp(z, -1)
                loss += ((lse - z.gather(1, y[:, None]).squeeze(1)) * tw).sum()
                if not training:
                    correct += ((z.argmax(-1) == y) & (tw == 1)).sum()
                    continue
                z.sub_(lse[:, None]).exp_()  # softmax, in place
                z[torch.arange(z.shape[0], device=z.device), y] -= 1.0
                z.mul_(tw[:, None])
                zc = z.to(compute_dtype)
                grad_h[s:s + chunk] = (zc @ w).float()
                if grad_w is not None:
                    grad_w += (zc.t() @ h).float()
            ctx.save_for_backward(grad_h / denom if training else None, grad_w / denom if grad_w is not None else None)
            ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
            ctx.mark_non_differentiable(correct)
            return loss / denom, correct

        @staticmethod
        def backward(ctx, grad_loss, _grad_correct):
            grad_h, grad_w = ctx.saved_tensors
            gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
            return (grad_h * grad_loss).to(ctx.hidden_dtype), gw, None, None, None, None, None

    return FusedLinearCrossEntropy


def fused_head_ok(model) -> bool:
    """The fused loss computes logits as h @ W^T; heads with a bias, scaling or soft-capping use the model's own."""
    config = model.config
    head = model.get_output_embeddings()
    return (head is not None and getattr(head, "bias", None) is None and head.weight.ndim == 2
            and not getattr(config, "final_logit_softcapping", None) and getattr(config, "logit_scale", 1.0) in (None, 1.0))


def make_trainer_class():
    import torch
    from trl import SFTTrainer

    FusedCE = fused_linear_cross_entropy()

    class FineTuner(SFTTrainer):
        """SFTTrainer with a per-token weighted loss (prompt_loss_weight) that only computes the LM head where a token
        is trained, and cheap metrics: tokens per second in training, token accuracy in evaluation."""

        def __init__(self, *args, fused_head: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.fused_head = fused_head
            self.loss_is_scaled_for_ga = True  # the loss is divided by the window's summed weights, see below
            self.trained_tokens, self._last_log = 0, (time.perf_counter(), 0)

        def _get_num_items_in_batch(self, batch_samples, device):
            """The loss denominator: the summed token weights of the whole accumulation window, on all ranks."""
            total = sum(b["loss_weights"][:, 1:].sum() for b in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                total = self.accelerator.gather(total).sum()
            return total

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights = inputs.pop("loss_weights")[:, 1:]
            targets = inputs.pop("labels")[:, 1:]
            keep = weights > 0
            denom = num_items_in_batch if num_items_in_batch is not None else weights.sum().clamp(min=1e-6)
            unwrapped = self.accelerator.unwrap_model(model)
            base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
            if self.fused_head:
                # The model's own forward (so DDP, autocast and hooks apply) with no logits kept; the head runs here.
                none = torch.zeros(0, dtype=torch.long, device=targets.device)
                out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=none)
                hidden = out.hidden_states[-1][:, :-1][keep]
                dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
                loss, correct = FusedCE.apply(hidden, base.get_output_embeddings().weight, targets[keep], weights[keep],
                                              denom, dtype, torch.is_grad_enabled())
            else:
                logits = model(**inputs, use_cache=False).logits[:, :-1].float()
                ce = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")
                loss = (ce * weights[keep]).sum() / denom
                correct = ((logits[keep].argmax(-1) == targets[keep]) & (weights[keep] == 1)).sum()
            if self.args.average_tokens_across_devices and self.args.world_size > 1 and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the denominator already spans ranks
            mode = "train" if model.training else "eval"
            if mode == "train":
                self.trained_tokens += int(inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel())
            else:
                completion = int((weights == 1).sum())
                self._metrics["eval"]["mean_token_accuracy"].append(int(correct) / max(completion, 1))
            return (loss, None) if return_outputs else loss

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if "loss" in logs:  # Trainer logs on every rank, so the gather below is matched on all of them
                tokens = self.trained_tokens
                if self.args.world_size > 1:
                    tokens = int(self.accelerator.gather(torch.tensor([tokens], device=self.args.device)).sum())
                now = time.perf_counter()
                t0, n0 = self._last_log
                logs["tokens_per_second"] = round((tokens - n0) / max(now - t0, 1e-9), 1)
                logs["num_tokens"] = tokens
                self._last_log = (now, tokens)
            super().log(logs, start_time)

    return FineTuner


def make_stop_on_signal():
    """A callback that turns SIGINT/SIGTERM (Ctrl-C, a scheduler preempting the job) into: finish the current step,
    save a checkpoint, stop. A second signal interrupts at once."""
    import torch
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def __init__(self):
            self.signum, self.previous = None, {}

        def _handle(self, signum, frame):
            if self.signum is not None:
                raise KeyboardInterrupt
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to stop at once)", file=sys.stderr)

        def on_train_begin(self, args, state, control, **kwargs):
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

        def on_step_end(self, args, state, control, **kwargs):
            stop = torch.tensor(float(self.signum or 0))
            if args.world_size > 1:  # every rank must stop at the same step, or the others wait forever
                torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
            if stop.item():
                self.signum = int(stop.item())
                control.should_save = control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)

    return StopOnSignal()


def decide_gradient_checkpointing(cfg: Config, device: str) -> bool:
    """auto: recompute activations only when the run would not fit in 90% of this machine's memory without it."""
    if cfg.gradient_checkpointing != "auto":
        return cfg.gradient_checkpointing
    return estimate_memory(cfg, load_model_config(cfg), False, device)["total"] > 0.9 * available_memory(device)


def make_training_args(cfg: Config, precision: str, device: str, gradient_checkpointing: bool, has_eval: bool):
    from trl import SFTConfig

    report = {"none": "none", "all": ["wandb", "tensorboard"]}.get(cfg.report_to, [cfg.report_to])
    return SFTConfig(
        output_dir=cfg.output_dir, run_name=cfg.run_name or Path(cfg.output_dir).name, report_to=report,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, optim=cfg.optim, max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed, data_seed=cfg.seed, bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device == "cpu",
        activation_checkpointing=gradient_checkpointing, activation_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs,
        eval_strategy=cfg.eval_strategy if has_eval else "no", eval_steps=cfg.eval_steps or cfg.logging_steps,
        logging_steps=cfg.logging_steps, logging_first_step=True, save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        # Data is tokenized and collated here (per-token loss weights), so TRL's preparation is skipped.
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, prediction_loss_only=True,
        ddp_find_unused_parameters=False, push_to_hub=False, dataloader_num_workers=0,
        fsdp=cfg.fsdp, fsdp_config=cfg.fsdp_config, deepspeed=cfg.deepspeed,
    )


def make_trainer(cfg: Config, model, tokenizer, train_set, eval_set, precision: str, device: str,
                 gradient_checkpointing: bool = False):
    from transformers import TrainerCallback

    padding_free = device == "cpu"
    args = make_training_args(cfg, precision, device, gradient_checkpointing, eval_set is not None)
    metrics_file = Path(cfg.output_dir) / "metrics.jsonl"

    class RunLog(TrainerCallback):
        """Every logged line also goes to output_dir/metrics.jsonl, and each evaluation redraws output_dir/loss.png,
        so a run can be followed (and read after a crash) without wandb or tensorboard."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with metrics_file.open("a") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

        def on_evaluate(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                plot_curves(state.log_history, Path(cfg.output_dir) / "loss.png")

    FineTuner = make_trainer_class()
    unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
    return FineTuner(
        model=model, args=args, train_dataset=train_set.remove_columns("length"),
        eval_dataset=eval_set.remove_columns("length") if eval_set is not None else None, processing_class=tokenizer,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id, padding_free), callbacks=[RunLog()],
        fused_head=fused_head_ok(unwrapped),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Evaluate: greedy generation on held-out prompts, scored by exact match, token F1 and JSON field accuracy.
# ---------------------------------------------------------------------------------------------------------------------

def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    import torch

    device = next(model.parameters()).device
    half = next((p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)), None)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    model.eval()
    try:
        for s in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[s:s + batch_size], return_tensors="pt", padding=True).to(device)
            with torch.inference_mode(), torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = prediction.split(), reference.split()
    common = sum(min(pred.count(t), ref.count(t)) for t in set(ref))
    if not pred or not ref or not common:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_json_object(text: str) -> dict | None:
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def score_answers(predictions: list[str], references: list[str]) -> dict:
    """exact_match and token_f1 for any text; json_valid and json_field_accuracy when the references are JSON objects."""
    n = max(len(references), 1)
    scores = {"examples": len(references),
              "exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n,
              "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n}
    refs = [parse_json_object(r) for r in references]
    if refs and all(refs):
        preds = [parse_json_object(p) for p in predictions]
        fields = sum(len(r) for r in refs)
        right = sum(sum(p is not None and p.get(k) == v for k, v in r.items()) for p, r in zip(preds, refs))
        scores.update(json_valid=sum(p is not None for p in preds) / n, json_field_accuracy=right / max(fields, 1))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}


def evaluate_generation(model, tokenizer, pairs: list[tuple[str, str]], cfg: Config) -> tuple[dict, list[dict]]:
    """(scores, samples) of greedy answers to the test prompts."""
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    answers = generate_answers(model, tokenizer, prompts, cfg.eval_max_new_tokens, batch_size=max(cfg.batch_size, 8))
    samples = [{"prompt": p, "reference": r, "answer": a, "exact": a.strip() == r.strip()} for p, r, a in zip(prompts, references, answers)]
    return score_answers(answers, references), samples


def results_table(base: dict | None, tuned: dict) -> str:
    rows = [f"{'metric':<22}{'base':>10}{'fine-tuned':>12}"]
    for key, value in tuned.items():
        if key == "examples":
            continue
        before = f"{base[key]:.3f}" if base and key in base else "-"
        rows.append(f"{key:<22}{before:>10}{value:>12.3f}")
    return "\n".join(rows)


def plot_curves(history: list[dict], path: Path) -> None:
    """Training and validation loss against step, learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, marker in (("loss", "training loss", None), ("eval_loss", "validation loss", "o")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker=marker, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper center")
    rates = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h]
    if rates:
        lr_axis = ax.twinx()
        lr_axis.plot(*zip(*rates), color="gray", linestyle="--", linewidth=1)
        lr_axis.set_ylabel("learning rate (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def overfitting_step(history: list[dict]) -> int | None:
    """The step of the lowest validation loss, if validation loss has since risen while training loss kept falling."""
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if len(evals) < 3:
        return None
    best_step, best = min(evals, key=lambda e: e[1])
    train_before = [h["loss"] for h in history if "loss" in h and h["step"] <= best_step]
    train_after = [h["loss"] for h in history if "loss" in h and h["step"] > best_step]
    if evals[-1][1] > best * 1.01 and train_before and train_after and min(train_after) < train_before[-1]:
        return best_step
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Save and push: the final model folder appears whole (written aside, then renamed), then optionally goes to the Hub.
# ---------------------------------------------------------------------------------------------------------------------

def model_card(cfg: Config, summary: dict) -> str:
    load = ("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(\"PATH\")"
            if cfg.use_peft else "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"PATH\")")
    method = "QLoRA (4-bit)" if cfg.load_in_4bit else "LoRA (8-bit base)" if cfg.load_in_8bit else "LoRA" if cfg.use_peft else "full fine-tune"
    table = results_table(summary.get("base"), summary["fine_tuned"]) if summary.get("fine_tuned") else "(no test rows scored)"
    return f"""---
base_model: {cfg.model_name}
library_name: {'peft' if cfg.use_peft else 'transformers'}
tags: [finetune.py, {'lora' if cfg.use_peft else 'full-fine-tune'}]
---
# {Path(cfg.output_dir).name}

Fine-tuned from `{cfg.model_name}` on `{cfg.dataset_name}` with {method} by finetune.py.

## Training
- method: {method}{f", r={cfg.peft_lora_r}, alpha={cfg.peft_lora_alpha}, dropout={cfg.peft_lora_dropout}, modules={cfg.peft_target_modules}" if cfg.use_peft else ""}
- learning rate {cfg.learning_rate} ({cfg.lr_scheduler_type}, warmup {cfg.warmup_ratio}), batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation, {summary.get('steps')} steps, seed {cfg.seed}
- prompt loss weight {cfg.prompt_loss_weight}, seq_length {cfg.seq_length}, precision {summary.get('precision')}
- final training loss {summary.get('train_loss')}, validation loss {summary.get('eval_loss')}

## Results on held-out prompts (greedy)
```
{table}
```
![loss curve](loss.png)

## Use
```python
{load}
```
The full configuration is in `config.yml`, the training log in `metrics.jsonl`, the scored answers in `eval.json`.
"""


def write_final(trainer, tokenizer, cfg: Config, summary: dict) -> Path:
    """Save model (or adapter), tokenizer, config, metrics and card to output_dir/final, atomically."""
    out = Path(cfg.output_dir)
    tmp, final = out / ".final.tmp", out / "final"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "config.yml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    for name in ("metrics.jsonl", "loss.png"):
        if (out / name).exists():
            shutil.copy(out / name, tmp / name)
    (tmp / "eval.json").write_text(json.dumps(summary, indent=2))
    (tmp / "README.md").write_text(model_card(cfg, summary))
    if final.exists():
        old = out / ".final.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def push_folder(cfg: Config, folder: Path) -> str:
    """Upload the final folder to the Hub with the token from the environment; fails with a clear message."""
    from huggingface_hub import HfApi

    if not (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        raise UserError(f"push_to_hub: no HF_TOKEN in the environment; the model is saved in {folder}; "
                        f"export HF_TOKEN=... and run: python finetune.py push --config <your config>")
    api = HfApi()
    try:
        api.create_repo(cfg.hub_model_id, private=cfg.hub_private_repo, exist_ok=True)
        api.upload_folder(repo_id=cfg.hub_model_id, folder_path=str(folder), commit_message="finetune.py: upload model")
    except Exception as e:
        raise UserError(f"push_to_hub: upload to {cfg.hub_model_id} failed ({first_line(e)}); the model is saved in {folder}") from None
    return f"https://huggingface.co/{cfg.hub_model_id}"


# ---------------------------------------------------------------------------------------------------------------------
# Use a finished run: score it, answer prompts (beside the base model), merge the adapter, push.
# ---------------------------------------------------------------------------------------------------------------------

def saved_folder(cfg: Config, path: str | None = None) -> Path:
    folder = Path(path) if path else Path(cfg.output_dir) / "final"
    if not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
        raise UserError(f"no saved model in {folder}: train first, or pass --model PATH to a run's final folder")
    return folder


def load_finetuned(cfg: Config, folder: Path):
    """(model, tokenizer) of a saved run: the configured base plus the adapter, or the saved full model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device()
    precision = resolve_precision(cfg, device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base_model(cfg, precision, device, attn=None), folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(precision))
    if device == "cuda" and not (cfg.load_in_4bit or cfg.load_in_8bit):
        model = model.to(device)
    return model, tokenizer


@contextmanager
def base_model(cfg: Config, model):
    """The base model beside a saved run: its adapter switched off, or (for a full fine-tune) the base loaded again."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        device = pick_device()
        yield load_base_model(cfg, resolve_precision(cfg, device), device, attn=None).to(device)


def saved_summary(folder: Path) -> dict:
    """A saved run's eval.json (scores, steps, data format), or {} when it has none."""
    return json.loads((folder / "eval.json").read_text()) if (folder / "eval.json").exists() else {}


def eval_run(cfg: Config, folder: Path) -> dict:
    """`eval`: the after-training evaluation again, on any saved run; updates the run's eval.json."""
    model, tokenizer = load_finetuned(cfg, folder)
    val_rows = load_dataset_splits(cfg)[1] if not cfg.test_dataset else None
    pairs = test_pairs(load_test_rows(cfg, val_rows), tokenizer, cfg)
    if not pairs:
        raise UserError("nothing to score: set test_dataset to a prompt/completion or messages file, or validation_split > 0")
    summary = saved_summary(folder)
    if cfg.eval_before:
        with base_model(cfg, model) as base:
            summary["base"] = evaluate_generation(base, tokenizer, pairs, cfg)[0]
    summary["fine_tuned"], samples = evaluate_generation(model, tokenizer, pairs, cfg)
    summary["wrong"] = [s for s in samples if not s["exact"]]
    (folder / "eval.json").write_text(json.dumps(summary, indent=2))
    print(results_table(summary.get("base"), summary["fine_tuned"]))
    return summary


def model_prompts(texts: list[str], tokenizer, folder: Path) -> list[str]:
    """Users' prompts as the model was trained to see them: through the chat template when it learned from chat
    messages (or nothing else is known and the model has a template), raw when it learned from raw prompts."""
    chat = saved_summary(folder).get("data_format", "messages") == "messages" and getattr(tokenizer, "chat_template", None)
    if not chat:
        return list(texts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts]


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    found = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file: file not found: {prompts_file}")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line) if line.lstrip().startswith("{") else line
                found.append(row["prompt"] if isinstance(row, dict) and "prompt" in row else row)
    if not found or not all(isinstance(p, str) for p in found):
        raise UserError("generate needs prompts: --prompt TEXT (repeatable) or --prompts-file FILE (one per line, or jsonl with 'prompt')")
    return found


def generate_run(cfg: Config, folder: Path, prompts: list[str], compare: bool) -> list[dict]:
    """`generate`: greedy answers of the fine-tuned model, and with --compare of the base model beside them."""
    model, tokenizer = load_finetuned(cfg, folder)
    texts = model_prompts(prompts, tokenizer, folder)
    tuned = generate_answers(model, tokenizer, texts, cfg.eval_max_new_tokens)
    base = [None] * len(texts)
    if compare:
        with base_model(cfg, model) as reference:
            base = generate_answers(reference, tokenizer, texts, cfg.eval_max_new_tokens)
    results = [{"prompt": p, "fine_tuned": t, "base": b} for p, t, b in zip(prompts, tuned, base)]
    for r in results:
        print(f"### prompt\n{r['prompt']}")
        if compare:
            print(f"--- base\n{r['base'].strip()}")
        print(f"--- fine-tuned\n{r['fine_tuned'].strip()}\n")
    return results


def merge_run(cfg: Config, folder: Path) -> Path:
    """`merge`: the adapter folded into the base weights, saved as a standalone safetensors model in
    <output_dir>/merged. The base is reloaded in 16-bit (never merged into 4/8-bit weights, which would round the
    update away)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    if not (folder / "adapter_config.json").exists():
        raise UserError(f"{folder} holds a full model, not an adapter: it is already standalone")
    device = pick_device()
    precision = resolve_precision(cfg, device)
    base = load_base_model(cfg, precision, device, attn=None, quantize=False)
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    out = Path(cfg.output_dir) / "merged"
    tmp = out.with_name(".merged.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Memory estimate: expected peak memory of a run from the model's config alone (no weights loaded).
# ---------------------------------------------------------------------------------------------------------------------

def load_model_config(cfg: Config):
    from transformers import AutoConfig

    source, extra = model_source(cfg.model_name)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, token=hub_token(cfg), **extra)
    except Exception as e:
        raise UserError(f"model_name {cfg.model_name!r}: cannot read its config ({first_line(e)})") from None


def available_memory(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


GiB = 2**30
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
              "g": GiB, "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise UserError(f"--estimate: cannot read the budget {text!r}; write it like 24GiB, 16GB or 512MiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def estimate_memory(cfg: Config, model_config, gradient_checkpointing: bool, device: str = "cpu") -> dict[str, int]:
    """Expected peak bytes of a training run, by component, for a Llama-like decoder, from its config alone.
    Activation bytes per token and layer follow the layer shapes, scaled to peaks measured on this project's CPU runs
    (bench/ and tests/test_estimate.py): LoRA over a 16-bit base; x1.58 for k-bit bases, whose embeddings and norms PEFT
    keeps in fp32 (so the residual stream is fp32); x1.2 for full fine-tunes (fp32 master weights under autocast)."""
    c = model_config
    hidden, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    inter = getattr(c, "intermediate_size", None) or 4 * hidden
    heads = c.num_attention_heads
    kv = (getattr(c, "num_key_value_heads", None) or heads) * (getattr(c, "head_dim", None) or hidden // heads)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    linear = sum(i * o for i, o in shapes) * layers
    embed = vocab * hidden * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    half = 4 if cfg.precision == "fp32" else 2
    if cfg.load_in_4bit:
        weights = linear * (0.5 + (0.127 if cfg.bnb_4bit_use_double_quant else 0.5) / 8) + embed * 4
    elif cfg.load_in_8bit:
        weights = linear * 1.0 + embed * 4
    else:
        weights = (linear + embed) * (half if cfg.use_peft else 4)
    if cfg.use_peft:
        targeted = shapes if cfg.peft_target_modules == "all-linear" else [s for n, s in zip(names, shapes) if n in cfg.peft_target_modules]
        trainable = sum(cfg.peft_lora_r * (i + o) for i, o in targeted) * layers
    else:
        trainable = linear + embed
    state_bytes = {"sgd": 0, "adafactor": 1, "adamw_bnb_8bit": 2, "paged_adamw_8bit": 2, "lion_8bit": 1}.get(cfg.optim, 8)
    tokens = cfg.batch_size * cfg.seq_length
    per_token_layer = (16 * hidden + 8 * kv + 5 * inter) * half * (1.58 if quantized else 1.0 if cfg.use_peft else 1.2)
    if gradient_checkpointing:  # layer inputs only, plus one layer's activations during its recompute
        activations = tokens * layers * hidden * (4 if quantized else half) + tokens * per_token_layer
    else:
        activations = tokens * layers * per_token_layer
    chunk_rows = min(tokens, 2**25 // vocab)
    loss = chunk_rows * vocab * 4 * 3 + tokens * hidden * 4  # fp32 logit chunk, its softmax/grad, the hidden grad
    runtime = int(1.2 * GiB) if device == "cpu" else GiB // 2  # Python + torch + libraries (RSS) / CUDA context
    # LoRA parameters are fp32 beside the base (value + gradient); a full fine-tune's are the weights (gradient only)
    parts = {"weights": weights, "trainable parameters + gradients": trainable * (8 if cfg.use_peft else 4),
             "optimizer states": trainable * state_bytes,
             "activations": activations, "loss (LM head chunks)": loss, "runtime": runtime}
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def settings_that_fit(cfg: Config, model_config, budget: int, device: str) -> list[str]:
    """Ways to fit the budget, cheapest change first: checkpointing, smaller batches with more accumulation, 4-bit."""
    found = []
    bases = [{}] + ([{"load_in_4bit": True, "load_in_8bit": False}] if cfg.use_peft and not cfg.load_in_4bit else [])
    for base in bases:
        for checkpointing in (False, True):
            batch = cfg.batch_size
            while batch >= 1:
                change = {**base, "gradient_checkpointing": checkpointing, "batch_size": batch,
                          "gradient_accumulation_steps": max(1, cfg.gradient_accumulation_steps * cfg.batch_size // batch)}
                total = estimate_memory(cfg.model_copy(update=change), model_config, checkpointing, device)["total"]
                if total <= budget:
                    found.append(" ".join(f"{k}={str(v).lower()}" for k, v in change.items()) + f"  (~{gib(total)})")
                    break
                batch //= 2
    return found


def estimate_run(cfg: Config, budget: str | None) -> None:
    """--estimate: print the expected peak memory of the configured run (no weights loaded), and what fits a budget."""
    device = pick_device()
    model_config = load_model_config(cfg)
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing != "auto" else decide_gradient_checkpointing(cfg, device)
    parts = estimate_memory(cfg, model_config, checkpointing, device)
    method = "QLoRA 4-bit" if cfg.load_in_4bit else "LoRA 8-bit" if cfg.load_in_8bit else "LoRA" if cfg.use_peft else "full fine-tune"
    print(f"memory estimate: {cfg.model_name}, {method}, batch {cfg.batch_size} x {cfg.seq_length} tokens, "
          f"gradient checkpointing {'on' if checkpointing else 'off'}, on {device}")
    for name, value in parts.items():
        print(f"  {name:<36}{gib(value):>12}")
    if budget:
        limit = parse_size(budget)
        verdict = "fits" if parts["total"] <= limit else "does not fit"
        print(f"budget {gib(limit)}: the configured run {verdict}")
        options = settings_that_fit(cfg, model_config, limit, device)
        print("settings that fit:" if options else "nothing fits: use a smaller model or a shorter seq_length")
        for option in options:
            print(f"  {option}")


# ---------------------------------------------------------------------------------------------------------------------
# Run: the output folder and its lock, checkpoints to resume, and the pipeline end to end.
# ---------------------------------------------------------------------------------------------------------------------

def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (they set RANK), or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def lock_output_dir(out: Path):
    """An exclusive lock on output_dir/.lock for this process's lifetime: a second run on the same folder refuses."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    handle = (out / ".lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise UserError(f"output_dir {out} is in use by a running job ({holder}); wait for it or choose another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def check_output_dir(cfg: Config) -> None:
    """Refuse to mix runs: an output_dir holding another run's results needs overwrite_output_dir or a resume."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; pick a folder name")
    used = out.is_dir() and any(p.name != ".lock" for p in out.iterdir())
    if used and not (cfg.overwrite_output_dir or cfg.resume_from_checkpoint):
        raise UserError(f"output_dir {out} already holds a run; set resume_from_checkpoint: auto to continue it, "
                        f"overwrite_output_dir: true to replace it, or choose another output_dir")


def clear_output_dir(cfg: Config) -> None:
    """With overwrite_output_dir, remove the earlier run; called once data and model have loaded, under the lock, so
    that a run refused for bad input leaves the earlier one whole."""
    if cfg.overwrite_output_dir:
        for p in Path(cfg.output_dir).iterdir():
            if p.name != ".lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def safetensors_whole(path: Path) -> bool:
    """A safetensors file is whole when its size is exactly header + the data its header describes."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return path.stat().st_size == 8 + size + end


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (missing or cut-off files), or None when it is complete."""
    import zipfile

    weights = list(folder.glob("*.safetensors"))
    if not (folder / "trainer_state.json").exists():
        return "trainer_state.json is missing"
    if not weights:
        return "no weights file"
    for file in weights:
        if not safetensors_whole(file):
            return f"{file.name} is truncated"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (folder / name).exists():
            return f"{name} is missing"
        if not zipfile.is_zipfile(folder / name):
            return f"{name} is truncated"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except ValueError:
        return "trainer_state.json is truncated"
    return None


def resolve_checkpoint(cfg: Config) -> str | None:
    """The checkpoint to resume from: the named one (which must be complete), or with auto the newest complete one
    in output_dir, skipping (and naming) any that a crash cut off mid-write."""
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint != "auto":
        folder = Path(cfg.resume_from_checkpoint)
        if not folder.is_dir():
            raise UserError(f"resume_from_checkpoint: folder not found: {folder}")
        problem = checkpoint_problem(folder)
        if problem:
            raise UserError(f"resume_from_checkpoint: {folder} is incomplete ({problem}); use resume_from_checkpoint: auto to take the newest complete one")
        return str(folder)
    found = sorted(Path(cfg.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1, reverse=True)
    for folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            print(f"resuming from {folder}")
            return str(folder)
        print(f"warning: skipping {folder.name}: {problem} (cut off while being written); trying the previous checkpoint")
    print(f"resume_from_checkpoint: auto: no complete checkpoint in {cfg.output_dir}, starting fresh")
    return None


def summarize_logs(history: list[dict]) -> dict:
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {"train_loss": round(train[-1], 4) if train else None, "eval_loss": round(evals[-1], 4) if evals else None}


def check_sharding(cfg: Config, device: str) -> None:
    """FSDP and DeepSpeed are GPU engines: accelerate runs plain data parallel on CPUs, so say so rather than pretend."""
    if cfg.deepspeed:
        import importlib.util

        if not Path(cfg.deepspeed).is_file():
            raise UserError(f"deepspeed: config file not found: {cfg.deepspeed}")
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("deepspeed is set but the deepspeed package is not installed: pip install deepspeed")
    if (cfg.fsdp or cfg.deepspeed) and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UserError("fsdp/deepspeed shard across processes: launch with torchrun --nproc_per_node N finetune.py "
                        "(or accelerate launch finetune.py), or turn them off for a single process")
    if (cfg.fsdp or cfg.deepspeed) and device == "cpu":
        print("warning: fsdp/deepspeed shard across GPUs; on this CPU the run uses plain data parallel (DDP over gloo)",
              file=sys.stderr)


class Run(NamedTuple):
    trainer: Any
    tokenizer: Any
    pairs: list[tuple[str, str]]
    checkpoint: str | None
    precision: str
    data_format: str
    lock: Any  # held while the run lives; None on ranks other than 0


def prepare_trainer(cfg: Config) -> Run:
    """Data, output folder and model, wired into a trainer, with what the rest of the run needs to know."""
    from transformers import set_seed

    check_output_dir(cfg)
    lock = lock_output_dir(Path(cfg.output_dir)) if is_main_process() else None
    device = pick_device()
    check_sharding(cfg, device)
    precision = resolve_precision(cfg, device)
    tokenizer = load_tokenizer(cfg)
    train_rows, val_rows = load_dataset_splits(cfg)
    train_set, long_train = tokenize_dataset(train_rows, tokenizer, cfg, cfg.dataset_name)
    eval_set = tokenize_dataset(val_rows, tokenizer, cfg, cfg.dataset_name)[0] if val_rows is not None else None
    pairs = test_pairs(load_test_rows(cfg, val_rows), tokenizer, cfg)
    if long_train:
        print(f"{long_train} training examples are longer than seq_length={cfg.seq_length}: {cfg.long_examples}d")
    checkpoint = resolve_checkpoint(cfg)
    gradient_checkpointing = decide_gradient_checkpointing(cfg, device)
    set_seed(cfg.seed)
    model = build_model(cfg, precision, device, gradient_checkpointing)
    if is_main_process():
        clear_output_dir(cfg)
    trainable, total = count_parameters(model)
    print(f"model {cfg.model_name}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable; {device}, {precision}, "
          f"gradient checkpointing {'on' if gradient_checkpointing else 'off'}; {len(train_set)} training examples")
    trainer = make_trainer(cfg, model, tokenizer, train_set, eval_set, precision, device, gradient_checkpointing)
    fmt = data_format(train_rows.column_names, cfg, cfg.dataset_name)
    return Run(trainer, tokenizer, pairs, checkpoint, precision, fmt, lock)


def run_training(cfg: Config) -> Path:
    """The whole pipeline: prepare -> score the base -> train -> score the fine-tuned model -> save -> push."""
    started = time.time()
    trainer, tokenizer, pairs, checkpoint, precision, fmt, _lock = prepare_trainer(cfg)  # _lock: held until we return
    stopper = make_stop_on_signal()
    trainer.add_callback(stopper)
    summary: dict[str, Any] = {"precision": precision, "data_format": fmt}
    if cfg.eval_before and pairs and trainer.is_world_process_zero():
        summary["base"], _ = evaluate_generation(trainer.model, tokenizer, pairs, cfg)
        print("base model on the test rows:", summary["base"])
    trainer.train(resume_from_checkpoint=checkpoint)
    if stopper.signum:
        name = signal.Signals(stopper.signum).name
        raise Interrupted(f"{name}: stopped at step {trainer.state.global_step} with a checkpoint in {cfg.output_dir}; "
                          f"to continue, run the same command with resume_from_checkpoint=auto", stopper.signum)
    history = trainer.state.log_history
    summary.update(summarize_logs(history), steps=trainer.state.global_step)
    if not trainer.is_world_process_zero():
        return Path(cfg.output_dir) / "final"
    plot_curves(history, Path(cfg.output_dir) / "loss.png")
    best = overfitting_step(history)
    if best is not None:
        print(f"warning: overfitting: validation loss has risen since step {best} (its lowest) while training loss fell; "
              f"train fewer steps/epochs, use the checkpoint nearest step {best}, or add data")
    if pairs:
        summary["fine_tuned"], samples = evaluate_generation(trainer.model, tokenizer, pairs, cfg)
        summary["wrong"] = [s for s in samples if not s["exact"]]
        print(results_table(summary.get("base"), summary["fine_tuned"]))
    final = write_final(trainer, tokenizer, cfg, summary)
    print(f"saved to {final} in {time.time() - started:.0f}s")
    if cfg.merge_adapter and cfg.use_peft:
        print(f"merged model saved to {merge_run(cfg, final)}")
    if cfg.push_to_hub:
        print(f"pushed to {push_folder(cfg, final)}")
    return final


def validate_run(cfg: Config) -> None:
    """--validate: config, data (rows, token lengths, long examples) and model source, without training."""
    tokenizer = load_tokenizer(cfg)
    train_rows, val_rows = load_dataset_splits(cfg)
    train_set, too_long = tokenize_dataset(train_rows, tokenizer, cfg, cfg.dataset_name)
    lengths = sorted(train_set["length"])
    print(f"config ok; dataset {cfg.dataset_name}: {data_format(train_rows.column_names, cfg, cfg.dataset_name)} rows, "
          f"{len(train_rows)} train + {len(val_rows) if val_rows is not None else 0} validation")
    print(f"tokens per example: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
          f"{too_long} longer than seq_length={cfg.seq_length} ({cfg.long_examples})")
    pairs = test_pairs(load_test_rows(cfg, val_rows), tokenizer, cfg)
    print(f"test rows scored by generation: {len(pairs)}")
    print(f"model source ok: {cfg.model_name}")


# ---------------------------------------------------------------------------------------------------------------------
# CLI: train (default), eval, generate, merge, push; --validate and --estimate check without training.
# ---------------------------------------------------------------------------------------------------------------------

FAST_ALLOCATOR = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def maybe_reexec_with_fast_allocator() -> None:
    """glibc serves allocations over 32 MB with fresh mmap pages, so every large activation page-faults anew; keeping
    freed memory in the heap made elementwise passes ~2.5x faster on CPU. The setting must exist at process start."""
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or os.environ.get("FINETUNE_NO_REEXEC"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=FAST_ALLOCATOR)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


COMMANDS = {"train": "fine-tune as the config says (the default)",
            "validate": "check config, dataset and model source; train nothing (same as --validate)",
            "eval": "score a saved run on the test rows (base vs fine-tuned), update its eval.json",
            "generate": "answer --prompt / --prompts-file with the saved run (--compare: base beside it)",
            "merge": "merge the saved adapter into the base: a standalone model in <output_dir>/merged",
            "push": "upload the saved run to the Hub (hub_model_id, HF_TOKEN)"}


def parse_args(argv: list[str]):
    """[command] [--config PATH] [--validate] [key=value ...]; the command, when given, comes first."""
    import argparse

    commands = "\n".join(f"  {name:<10}{text}" for name, text in COMMANDS.items())
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one `error:` line with exit 2, like every other user mistake
            raise UserError(f"{message} (see python finetune.py --help)")

    parser = Parser(
        prog="finetune.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="python finetune.py [command] [--config PATH] [options] [key=value ...]",
        description=f"Fine-tune a causal LLM (LoRA, QLoRA or full) as config.yml describes.\n\ncommands:\n{commands}",
        epilog="overrides: any config key as key=value, e.g. batch_size=4 max_steps=50\n\n" + config_help())
    parser.add_argument("--config", default="config.yml", help="config file (default: ./config.yml)")
    parser.add_argument("--validate", action="store_true", help="check config, dataset and model source; train nothing")
    parser.add_argument("--estimate", nargs="?", const="", metavar="BUDGET",
                        help="print the run's expected peak memory (no weights loaded); with a budget such as 24GiB, what fits")
    parser.add_argument("--model", help="eval/generate/merge/push: the saved folder (default: <output_dir>/final)")
    parser.add_argument("--prompt", action="append", default=[], help="generate: a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="generate: prompts, one per line or jsonl with a 'prompt' field")
    parser.add_argument("--compare", action="store_true", help="generate: also answer with the base model")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    args = parser.parse_intermixed_args(argv[1:] if argv and argv[0] in COMMANDS else argv)
    args.command = command
    return args


def main(argv: list[str] | None = None) -> int:
    """The command line; `argv` given means an in-process call (tests), which never re-executes the interpreter."""
    as_script = argv is None
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(args.config, args.overrides)
        if args.estimate is not None:
            estimate_run(cfg, args.estimate)
        elif args.validate or args.command == "validate":
            validate_run(cfg)
        elif args.command == "eval":
            eval_run(cfg, saved_folder(cfg, args.model))
        elif args.command == "generate":
            generate_run(cfg, saved_folder(cfg, args.model), read_prompts(args.prompt, args.prompts_file), args.compare)
        elif args.command == "merge":
            print(f"merged model saved to {merge_run(cfg, saved_folder(cfg, args.model))}")
        elif args.command == "push":
            print(f"pushed to {push_folder(cfg, saved_folder(cfg, args.model))}")
        else:
            check_output_dir(cfg)  # before anything heavy, so a refused run answers at once
            if as_script:
                maybe_reexec_with_fast_allocator()
            run_training(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
