"""A corpus of bad inputs: config files, command-line overrides, dataset lists, data files of every supported format,
model paths, the environment and finished-run commands. Each one must be refused the way a user can act on: exit
status 2, stderr exactly one line starting with "error:" that names the culprit (key, file, line, list position...), no
traceback, and an existing output_dir left byte-for-byte as it was, even with overwrite_output_dir: true (the most
dangerous setting: a refused run must not cost the old one).

Every case runs in-process through finetune.main (fast); a few also run as `python finetune.py ...` in a subprocess,
as a user's shell sees them. The last tests cover inputs that are not refused, by design.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

import finetune
from helpers import (ONE_STEP, ROOT, assert_one_line_error, chat, numeric_fields, offline, out_of_range_values, run_cli,
                     run_main, snapshot, write_jsonl)

BIG = 20_000  # lines in the "large file" cases: the bad row sits in the middle, far from where a reader would look


def good_rows(n: int) -> list[dict]:
    return [{"prompt": f"Say {i}.", "completion": f" {i}"} for i in range(n)]


def json_lines(rows: list) -> list[bytes]:
    return [json.dumps(r).encode() for r in rows]


# ---------------------------------------------------------------------------------------------------------------------
# The workspace of one case: a tiny model, good data, and an output_dir that holds a finished run.
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Bad:
    """How to run one bad input, and the regex its one-line message must match."""
    argv: list[str]
    culprit: str
    env: dict[str, str] = field(default_factory=dict)
    unreadable: bool = False  # a file the user cannot read: root, who reads any, runs the case without that right


@dataclass
class Ctx:
    tmp: Path
    model: Path
    rows: list[dict]
    keep: list = field(default_factory=list)  # objects that must live until the run ends (a held lock)

    def __post_init__(self):
        self.good = write_jsonl(self.tmp / "train.jsonl", self.rows)
        self.old_run = self.tmp / "previous-run"
        for name, content in {"notes.txt": b"results of an earlier run\n",
                              "metrics.jsonl": b'{"loss": 1.5, "step": 2}\n',
                              "adapter_model.safetensors": os.urandom(4096),
                              "adapter_config.json": b'{"r": 16}',
                              "result.json": b'{"files": ["adapter_model.safetensors", "adapter_config.json"]}',
                              "checkpoint-2/trainer_state.json": b'{"global_step": 2}'}.items():
            (self.old_run / name).parent.mkdir(parents=True, exist_ok=True)
            (self.old_run / name).write_bytes(content)

    def base(self) -> dict:
        # Fast if a case gets as far as the model: tiny model, fp32, one step, no generation scoring; and
        # overwrite_output_dir so that only the bad input itself can stop the run.
        return dict(ONE_STEP, model_name=str(self.model), dataset_name=str(self.good), output_dir=str(self.old_run),
                    overwrite_output_dir=True)

    def config(self, text: str | bytes | None = None, name: str = "config.yml", **changes) -> str:
        """A config file: the raw text given, or the base config with `changes`."""
        path = self.tmp / name
        if text is None:
            text = yaml.safe_dump({**self.base(), **changes}, sort_keys=False)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    def run(self, *overrides: str, **changes) -> list[str]:
        return ["--config", self.config(**changes), *overrides]

    def file(self, name: str, content: bytes | str | list[bytes]) -> Path:
        path = self.tmp / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            content = b"".join(line + b"\n" for line in content)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def data(self, path: Path, culprit: str, **changes) -> Bad:
        """Train on `path`; the message must match `culprit`, where {path} stands for the file's path."""
        return Bad(self.run(dataset_name=str(path), **changes), culprit.replace("{path}", re.escape(str(path))))


# ---------------------------------------------------------------------------------------------------------------------
# The corpus. Each entry: id -> build(ctx) -> Bad.
# ---------------------------------------------------------------------------------------------------------------------

CASES: dict[str, Callable[[Ctx], Bad]] = {}


def case(case_id: str):
    def register(build):
        assert case_id not in CASES, case_id
        CASES[case_id] = build
        return build
    return register


def add(case_id: str, build: Callable[[Ctx], Bad]) -> None:
    case(case_id)(build)


# --- config file -----------------------------------------------------------------------------------------------------

@case("yaml-broken-bracket")
def _(c):
    path = c.config("model_name: x\nbatch_size: [4\nlearning_rate: 0.1\n")
    return Bad(["--config", path], rf"{re.escape(path)}: line \d+ .*YAML")


@case("yaml-tab-indent")
def _(c):
    path = c.config("peft_target_modules:\n\t- q_proj\n")
    return Bad(["--config", path], rf"{re.escape(path)}: line 2 .*YAML")


add("yaml-is-a-list", lambda c: Bad(["--config", p := c.config("- batch_size: 4\n- max_steps: 1\n")],
                                    rf"{re.escape(p)}: must be a mapping.*list"))
add("yaml-is-a-scalar", lambda c: Bad(["--config", p := c.config("batch_size=4\n")],
                                      rf"{re.escape(p)}: must be a mapping.*str"))
add("config-not-utf8", lambda c: Bad(["--config", p := c.config("output_dir: caf\u00e9\n".encode("latin-1"))],
                                     rf"{re.escape(p)}: not UTF-8"))
add("config-unknown-key", lambda c: Bad(c.run(lerning_rate=0.1), r"unknown key 'lerning_rate'.*'learning_rate'"))
add("config-missing", lambda c: Bad(["--config", p := str(c.tmp / "nope.yml")], rf"not found: {re.escape(p)}"))
add("config-is-a-directory", lambda c: Bad(["--config", str(c.tmp)], re.escape(str(c.tmp))))
add("config-bool-for-number", lambda c: Bad(["--config", c.config("learning_rate: yes\n")],
                                             r"learning_rate: expected a number"))
add("config-nan", lambda c: Bad(["--config", c.config("learning_rate: .nan\n")], r"learning_rate"))
add("config-infinite-epochs", lambda c: Bad(["--config", c.config("num_train_epochs: .inf\n")], r"num_train_epochs"))
add("config-bad-choice-precision", lambda c: Bad(c.run(precision="fp64"), r"precision: .*'fp64'"))
add("config-bad-choice-optim", lambda c: Bad(c.run(optim="adam"), r"optim: .*'adam'"))
add("config-list-for-text-model_name", lambda c: Bad(c.run(model_name=["a", "b"]), r"model_name"))
add("config-number-for-dict", lambda c: Bad(c.run(gradient_checkpointing_kwargs=5), r"gradient_checkpointing_kwargs"))
add("config-number-for-target-modules", lambda c: Bad(c.run(peft_target_modules=5), r"peft_target_modules"))
add("config-unknown-gguf-type", lambda c: Bad(c.run(export_gguf="q3_k"), r"export_gguf: Input should be 'f16', .*"
                                                                         r"'q4_k_m', .* or 'q2_k' \(got 'q3_k'\)"))
add("config-unknown-prompt-format", lambda c: Bad(c.run(prompt_format="alpaca"), r"prompt_format: .*'alpaca'"))


@case("config-unreadable-chmod-000")
def _(c):
    path = c.config()
    os.chmod(path, 0)
    return Bad(["--config", path], re.escape(path), unreadable=True)


# Contradictions: each names both sides.
CONTRADICTIONS = {
    "4bit-and-8bit": (dict(load_in_4bit=True, load_in_8bit=True), r"load_in_4bit.*load_in_8bit"),
    "4bit-without-peft": (dict(load_in_4bit=True, use_peft=False), r"use_peft.*load_in_4bit"),
    "no-epochs-no-steps": (dict(max_steps=-1, num_train_epochs=0), r"num_train_epochs.*max_steps"),
    "push-without-hub_model_id": (dict(push_to_hub=True), r"push_to_hub.*hub_model_id"),
    "fsdp-and-deepspeed": (dict(fsdp=True, deepspeed="ds.json"), r"fsdp.*deepspeed"),
    "resume-and-overwrite": (dict(resume_from_checkpoint="auto"), r"resume_from_checkpoint.*overwrite_output_dir"),
    "eval-steps-without-validation": (dict(eval_strategy="steps"), r"eval_strategy.*validation_split"),
    "empty-target-modules": (dict(peft_target_modules=[]), r"peft_target_modules"),
    "dora-without-peft": (dict(use_dora=True, use_peft=False), r"use_dora.*use_peft"),
    "early-stopping-without-evaluations": (dict(early_stopping_patience=3), r"early_stopping_patience.*eval_strategy"),
    "best-model-without-checkpoints": (dict(load_best_model_at_end=True, validation_split=0.2, eval_strategy="steps",
                                            save_strategy="no"), r"load_best_model_at_end.*save_strategy"),
    "best-model-saving-apart-from-evaluating": (dict(load_best_model_at_end=True, validation_split=0.2,
                                                     eval_strategy="epoch", save_strategy="steps"),
                                                r"load_best_model_at_end.*save_strategy.*eval_strategy"),
    "system-prompt-with-raw-prompts": (dict(system_prompt="Be brief.", prompt_format="raw"),
                                       r"system_prompt.*prompt_format"),
}
for _id, (_changes, _culprit) in CONTRADICTIONS.items():
    add(f"contradiction-{_id}", lambda c, ch=_changes, cu=_culprit: Bad(c.run(**ch), cu))

# An export llama.cpp's converter cannot make is refused before training, not after it.
@case("export-gguf-of-an-unsupported-architecture")
def _(c):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(c.model)
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=16, word_embed_proj_dim=16, ffn_dim=32,
                             num_hidden_layers=1, num_attention_heads=2)).save_pretrained(c.tmp / "opt")
    tokenizer.save_pretrained(c.tmp / "opt")
    return Bad(c.run(model_name=str(c.tmp / "opt"), export_gguf="q8_0"),
               r"export_gguf: .*opt is a OPTForCausalLM, which llama.cpp's converter cannot turn into GGUF .*; "
               r"set export_gguf: null$")


add("config-imatrix-for-a-type-without-one",
    lambda c: Bad(c.run(export_gguf="q8_0", gguf_imatrix=True), r"gguf_imatrix: q8_0 is not quantized by llama.cpp's "
                                                                r"quantizer.*q6_k, .*q2_k, or set gguf_imatrix: null"))
# llama.cpp (built once per machine) needs a compiler and cmake: refused before the first step where neither is found.
add("export-gguf-without-a-compiler",
    lambda c: Bad(c.run(export_gguf="q4_k_m"), r"export_gguf: GGUF export runs llama.cpp, built once from source on "
                                               r"this machine, and cmake and c\+\+ are not installed: install .*"
                                               r"apt install build-essential cmake",
                  env={"XDG_CACHE_HOME": str(c.tmp / "empty-cache"), "PATH": str(c.tmp / "no-tools")}))

# A memory budget: unreadable, or too small for the leanest settings (says by how much and what to change).
add("max-memory-unreadable", lambda c: Bad(c.run(max_memory="lots"), r"max_memory: .*'lots'.*8GiB"))
add("max-memory-too-small", lambda c: Bad(c.run(max_memory="300MiB"),
                                          r"max_memory=300MiB: the run needs about [0-9.]+ GiB even with batch_size=1 "
                                          r"x \d+ accumulation.*[0-9.]+ GiB over the budget; raise max_memory"))


# --- every numeric key, from the schema: a string in the config file, each bound broken on the command line ---------

for _key, _info in numeric_fields().items():
    add(f"config-{_key}-not-a-number",
        lambda c, k=_key: Bad(["--config", p := c.config(**{k: "abc"})], rf"{re.escape(p)}: {k}: "))
    for _value in out_of_range_values(_info):
        add(f"override-{_key}={_value}",
            lambda c, k=_key, v=_value: Bad(c.run(f"{k}={v}"), rf"\b{k}: .*got {re.escape(repr(v))}"))


# --- command-line overrides ----------------------------------------------------------------------------------------

# The culprit is on the command line: the message must show the value given there, or say where it came from.
add("override-bad-type", lambda c: Bad(c.run("batch_size=four"), r"batch_size: .*'four'|command line.*batch_size"))
add("override-list-for-int", lambda c: Bad(c.run("max_steps=[1, 2]"), r"max_steps"))
add("override-bare-word", lambda c: Bad(c.run("fast"), r"'fast'.*key=value"))
add("override-misspelled-command", lambda c: Bad(c.run("trian"), r"'trian'"))
add("override-unknown-key", lambda c: Bad(c.run("lerning_rate=0.1"),
                                           r"command line: unknown key 'lerning_rate'.*'learning_rate'"))
add("override-empty-key", lambda c: Bad(c.run("=5"), r"unknown key ''"))
add("option-unknown", lambda c: Bad(c.run("--nope"), r"--nope"))
add("option-config-without-path", lambda c: Bad(["--config"], r"--config"))


# --- data files of every supported format --------------------------------------------------------------------------

# One bad line in the middle of a 20,000-line file: (its line number, its bytes, what the message must say of it)
BAD_LINES = {
    "broken-line": (BIG // 2 + 1, b'{"prompt": "half a row", "completion": ', r"JSON"),
    "list-line": (12_345, b'["Say 1.", " 1"]', r"object.*list"),
    "non-utf8-line": (15_001, '{"prompt": "caf\u00e9?", "completion": " yes"}'.encode("latin-1"), r"UTF-8"),
    "number-completion": (10_000, b'{"prompt": "Say 2.", "completion": 2}', r"'completion'.*int"),
}


def big_file_with_bad_line(c, number: int, text: bytes, says: str) -> Bad:
    lines = json_lines(good_rows(BIG))
    lines[number - 1] = text
    return c.data(c.file(f"big-{number}.jsonl", lines), rf"{{path}}:{number}\b.*{says}")


for _id, (_number, _text, _says) in BAD_LINES.items():
    add(f"jsonl-{_id}-in-the-middle-of-20000",
        lambda c, n=_number, t=_text, s=_says: big_file_with_bad_line(c, n, t, s))


@case("jsonl-row-without-completion-in-the-middle")
def _(c):
    rows = good_rows(2_000)
    rows[1_000] = {"prompt": "Say nothing."}
    return c.data(c.file("missing.jsonl", json_lines(rows)), r"{path}.*row 1001\b.*'completion'")


# A message listing the row's fields lists the user's fields, not the trainer's own bookkeeping column.
USER_FIELDS_ONLY = rf"^(?!.*{finetune.ROW})"
QA_FIELDS = USER_FIELDS_ONLY + r".*{path}.*'answer'.*'question'"
QA_ROWS = [{"question": "q", "answer": "a"}] * 5
add("jsonl-without-needed-fields", lambda c: c.data(c.file("qa.jsonl", json_lines(QA_ROWS)), QA_FIELDS))
add("jsonl-empty", lambda c: c.data(c.file("empty.jsonl", b""), r"{path}.*empty"))
add("jsonl-blank-lines-only", lambda c: c.data(c.file("blank.jsonl", b"\n \n\n"), r"{path}.*empty"))
# Beyond the file, the message says what is wrong with it: the reader's own reason, not a generic "cannot read".
add("json-broken", lambda c: c.data(c.file("broken.json", b'[{"prompt": "a", "completion": "b"}, {"prompt": '),
                                    r"{path}.*JSON"))
add("json-not-rows", lambda c: c.data(c.file("scalar.json", b'"just a string"'), r"{path}.*(JSON|object|array)"))
add("json-array-of-arrays", lambda c: c.data(c.file("arrays.json", b'[["a", "b"], ["c", "d"]]'), r"{path}"))
add("json-object-wrapping-rows", lambda c: c.data(c.file("wrapped.json", json.dumps({"rows": good_rows(3)})),
                                                 USER_FIELDS_ONLY + r".*{path}.*'rows'"))
LATIN1_JSON = '[{"prompt": "caf\u00e9", "completion": "x"}]'.encode("latin-1")
add("json-not-utf8", lambda c: c.data(c.file("latin1.json", LATIN1_JSON), r"{path}.*(UTF-8|utf-8)"))
add("json-empty", lambda c: c.data(c.file("empty.json", b""), r"{path}.*empty"))
add("json-empty-array", lambda c: c.data(c.file("none.json", b"[]"), r"{path}.*(empty|no rows)"))
add("csv-without-needed-columns", lambda c: c.data(c.file("qa.csv", "question,answer\nq,a\nr,b\n"), QA_FIELDS))


@case("csv-ragged-row-in-the-middle-of-20000")
def _(c):
    lines = [b"prompt,completion"] + [f"Say {i}.,{i}".encode() for i in range(BIG)]
    lines[BIG // 2] = b"Say a, b and c.,abc"  # an unquoted comma: three fields where the header has two
    return c.data(c.file("ragged.csv", lines), rf"{{path}}.*\b{BIG // 2 + 1}\b")  # the line, as the CSV reader counts


add("csv-not-utf8", lambda c: c.data(c.file("latin1.csv", "prompt,completion\ncaf\u00e9,x\n".encode("latin-1")),
                                     r"{path}.*(UTF-8|utf-8)"))
add("csv-empty", lambda c: c.data(c.file("empty.csv", b""), r"{path}.*empty"))
add("csv-header-only", lambda c: c.data(c.file("header.csv", b"prompt,completion\n"), r"{path}.*(empty|no rows)"))


def parquet(c: Ctx, name: str, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = c.tmp / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


add("parquet-without-needed-columns",
    lambda c: c.data(parquet(c, "qa.parquet", {"question": ["q"] * 5, "answer": ["a"] * 5}), QA_FIELDS))


@case("parquet-null-completion-in-the-middle")
def _(c):
    rows = good_rows(2_000)
    completions = [r["completion"] for r in rows]
    completions[1_234] = None
    path = parquet(c, "nulls.parquet", {"prompt": [r["prompt"] for r in rows], "completion": completions})
    return c.data(path, r"{path}.*row 1235\b.*'completion'")


add("parquet-corrupt", lambda c: c.data(c.file("corrupt.parquet", os.urandom(2048)), r"{path}"))
add("parquet-truncated", lambda c: c.data(c.file("cut.parquet", parquet(c, "whole.parquet", {
    "prompt": ["a"] * 50, "completion": ["b"] * 50}).read_bytes()[:300]), r"{path}"))
add("parquet-empty", lambda c: c.data(c.file("empty.parquet", b""), r"{path}.*empty"))
add("data-unsupported-type", lambda c: c.data(c.file("train.txt", "prompt\tcompletion\n"), r"{path}.*'\.txt'"))
add("data-missing-file", lambda c: c.data(c.tmp / "data" / "nope.jsonl", r"not found: {path}"))


def folder(c: Ctx, name: str, files: dict[str, bytes | str | list[bytes]]) -> Path:
    for file, content in files.items():
        c.file(f"{name}/{file}", content)
    return c.tmp / "data" / name


add("data-empty-folder", lambda c: c.data(folder(c, "empty", {".keep": b""}), r"{path} holds no"))
add("data-folder-of-unsupported-files", lambda c: c.data(folder(c, "docs", {"notes.txt": "hi", "table.xlsx": "a\tb"}),
                                                         r"{path} holds no"))
add("data-folder-mixing-types", lambda c: c.data(
    folder(c, "mixed", {"a.jsonl": json_lines(good_rows(3)), "b.csv": "prompt,completion\na,b\n"}), r"{path} mixes"))
# A folder named like a data file, inside the dataset folder.
add("data-folder-holding-a-folder-named-jsonl", lambda c: c.data(
    folder(c, "parts", {"a.jsonl": json_lines(good_rows(3)), "b.jsonl/x": b""}), r"{path}.*b\.jsonl"))


@case("data-dangling-symlink")
def _(c):
    link = c.tmp / "link.jsonl"
    link.symlink_to(c.tmp / "gone.jsonl")
    return c.data(link, r"{path}")


@case("data-unreadable-chmod-000")
def _(c):
    path = write_jsonl(c.tmp / "secret.jsonl", c.rows)
    os.chmod(path, 0)
    return dataclasses.replace(c.data(path, r"{path}"), unreadable=True)


add("data-hub-id-offline", lambda c: Bad(c.run(dataset_name="someone/nonexistent-dataset"),
                                         r"someone/nonexistent-dataset", env={"HF_HUB_OFFLINE": "1"}))
add("data-all-rows-longer-than-seq_length-dropped", lambda c: c.data(c.good, r"{path}.*seq_length", seq_length=8,
                                                                     long_examples="drop"))
add("data-too-few-rows-for-validation", lambda c: c.data(write_jsonl(c.tmp / "one.jsonl", c.rows[:1]),
                                                         r"{path}.*validation_split", validation_split=0.2))
add("test-dataset-missing", lambda c: Bad(c.run(test_dataset=(p := str(c.tmp / "no-test.jsonl"))), re.escape(p)))


# --- rows in other formats, and the row number after a validation split ---------------------------------------------

GOOD_CHAT = chat(("user", "hi"), ("assistant", "hello"))
ROLE_CONTENT = "role.*content"
MESSAGES = {
    "messages-is-a-string": ({"messages": "user: hi"}, ROLE_CONTENT),
    "messages-is-a-list-of-strings": ({"messages": ["hi", "hello"]}, ROLE_CONTENT),
    "message-without-content": ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
                                "message 1: a user message needs text content"),
    "message-without-role": ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, ROLE_CONTENT),
    "message-with-null-content": ({"messages": [{"role": "user", "content": None},
                                                {"role": "assistant", "content": "x"}]}, "content"),
    "conversation-without-assistant": (chat(("system", "s"), ("user", "a"), ("user", "b")), "assistant"),
    "conversation-opening-with-assistant": (chat(("assistant", "How can I help?"), ("user", "Joke?"),
                                                 ("assistant", "No.")), "starts with an assistant"),
    "tool-call-without-function-name": ({"messages": [{"role": "user", "content": "Weather?"}, {
        "role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}]},
        r"message 2: tool_calls\[1\]: no function name"),
    "tool-call-arguments-not-json": ({"messages": [{"role": "user", "content": "Weather?"}, {
        "role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": Paris}'}}]}]},
        r"message 2: tool_calls\[1\]: arguments of get_weather are not valid JSON"),
    "tool-result-without-a-call": (chat(("user", "Weather?"), ("tool", "21 degrees"), ("assistant", "Warm.")),
                                   "message 2: a tool result with no tool call before it"),
    "tools-not-function-schemas": ({"tools": ["get_weather"], **GOOD_CHAT},
                                   r"tools must be a list of function schemas .*item 1 is not"),
}
for _id, (_row, _says) in MESSAGES.items():
    add(f"jsonl-{_id}-on-row-2", lambda c, r=_row, s=_says: c.data(
        write_jsonl(c.tmp / "chat.jsonl", [GOOD_CHAT, r, GOOD_CHAT]), rf"{{path}}: row 2\b.*{s}"))
add("jsonl-the-first-of-two-bad-conversations-is-named", lambda c: c.data(write_jsonl(c.tmp / "chat.jsonl", [
    {"messages": "?"} if i in (4, 199) else GOOD_CHAT for i in range(300)]), r"{path}: row 5\b", validation_split=0.5))
add("jsonl-null-text-on-row-2", lambda c: c.data(write_jsonl(c.tmp / "text.jsonl", [{"text": "a"}, {"text": None}]),
                                                 r"{path}:2: 'text' is NoneType"))



# --- the shapes users bring from the Hub: Alpaca, ShareGPT, OpenAI fine-tuning rows ---------------------------------

ALPACA = {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
CALL_TOOLS = {"tools": json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}])}


def sharegpt(*turns: tuple[str, str], **columns) -> dict:
    return {"conversations": [{"from": who, "value": text} for who, text in turns], **columns}


SHAPES = {
    "sharegpt-from-that-is-no-role": ("s.jsonl", SHAREGPT, sharegpt(("human", "hi"), ("bot", "hello")), {},
                                      r"row 2: message 2: from 'bot' is no role; .*roles: \{bot: user\}"),
    "sharegpt-tools-not-json": ("s.jsonl", SHAREGPT, {**SHAREGPT, "tools": "[{name: get_weather"}, {},
                                r"row 2: tools is not valid JSON"),
    "sharegpt-function-call-not-json": ("s.jsonl", SHAREGPT, sharegpt(("human", "Weather?"), (
        "function_call", "get_weather(Paris)"), **CALL_TOOLS), {},
        r"row 2: message 2: value: a function_call turn must be the JSON of a call"),
    "sharegpt-function-call-without-name": ("s.jsonl", SHAREGPT, sharegpt(("human", "Weather?"), (
        "function_call", '{"arguments": {}}'), **CALL_TOOLS), {}, r"row 2: message 2: tool_calls\[1\]: no function "
                                                                 r"name"),
    "sharegpt-observation-before-any-call": ("s.jsonl", SHAREGPT, sharegpt(("human", "Weather?"), (
        "observation", "21"), ("gpt", "Warm.")), {}, r"row 2: message 2: a tool result with no tool call before it"),
    "sharegpt-turn-order-the-template-refuses": ("s.jsonl", SHAREGPT, sharegpt(("human", "hi"), ("human", "there"), (
        "gpt", "hello")), {"chat_template": "{alternating}"}, r"row 2: the chat template refuses this conversation "
                                                             r"\(Conversation roles must alternate"),
    "sharegpt-conversations-not-a-list": ("s.jsonl", SHAREGPT, {"conversations": "human: hi"}, {},
                                          r"row 2: 'conversations' must be a non-empty list of message objects"),
    "sharegpt-value-not-text": ("s.jsonl", SHAREGPT, sharegpt(("human", "hi"), ("gpt", "hello")) | {
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 5}]}, {},
        r"row 2: message 2: an assistant message needs text content"),
    "alpaca-history-not-pairs": ("a.jsonl", ALPACA, {**ALPACA, "history": [["Add 1 and 1.", "2", "extra"]]}, {},
                                 r"row 2: 'history' must be a list of \[instruction, response\] pairs of text; item 1"),
    "alpaca-history-a-string": ("a.jsonl", ALPACA, {**ALPACA, "history": "Add 1 and 1. 2"}, {},
                                r"row 2: 'history' must be a list of \[instruction, response\] pairs"),
    "alpaca-output-a-number": ("a.jsonl", ALPACA, {**ALPACA, "output": 5}, {}, r":2: 'output' is int, expected text"),
    "alpaca-input-a-list": ("a.jsonl", ALPACA, {**ALPACA, "input": ["2", "3"]}, {}, r":2: 'input' is list, expected "
                                                                                    r"text"),
    "alpaca-instruction-null": ("a.jsonl", ALPACA, {**ALPACA, "instruction": None}, {},
                                r"row 2: 'instruction' is NoneType, expected text"),
    "openai-weight-2": ("o.jsonl", GOOD_CHAT, {"messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "content": "hello", "weight": 2}]}, {},
        r"row 2: message 2: weight must be 0 .* or 1 .*got 2"),
    "openai-weight-on-a-user-message": ("o.jsonl", GOOD_CHAT, {"messages": [
        {"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "hello"}]}, {},
        r"row 2: message 1: weight .*only an assistant message is trained; got 1 on a user message"),
    "mapped-role-missing-from-roles": ("m.jsonl", {"dialog": [{"speaker": "human", "text": "hi"}, {
        "speaker": "bot", "text": "hello"}]}, {"dialog": [{"speaker": "human", "text": "hi"}, {
            "speaker": "robot", "text": "hello"}]},
        {"messages_field": "dialog", "role_key": "speaker", "content_key": "text",
         "roles": {"human": "user", "bot": "assistant"}},
        r"row 2: message 2: speaker 'robot' is no role"),
    "format-alpaca-on-prompt-completion-rows": ("p.jsonl", {"prompt": "a", "completion": "b"},
                                                {"prompt": "c", "completion": "d"}, {"format": "alpaca"},
                                                r"format: alpaca needs the column 'instruction'"),
}
# ChatML that refuses turns out of order, as Gemma's and Llama 2's templates do.
ALTERNATING = ("{%- for m in messages %}{%- if m['role'] == 'user' and loop.previtem is defined and "
               "loop.previtem['role'] == 'user' %}{{ raise_exception('Conversation roles must alternate') }}"
               "{%- endif %}"
               + (ROOT / "templates" / "chatml.jinja").read_text().split("{%- for message in messages %}", 1)[0]
               + "{%- endfor %}" + (ROOT / "templates" / "chatml.jinja").read_text())


def shape_case(c: Ctx, name: str, good: dict, bad: dict, changes: dict, says: str) -> Bad:
    if changes.get("chat_template") == "{alternating}":
        (c.tmp / "alternating.jinja").write_text(ALTERNATING)
        changes = {**changes, "chat_template": str(c.tmp / "alternating.jinja")}
    return c.data(write_jsonl(c.tmp / name, [good, bad, good]), rf"{{path}}: {says}" if says.startswith("row")
                  else rf"{{path}}.*{says}", **changes)


for _id, _case in SHAPES.items():
    add(_id, lambda c, args=_case: shape_case(c, *args))


@case("sharegpt-parquet-from-that-is-no-role-named-by-its-row-after-the-split")
def _(c):
    conversations = [SHAREGPT["conversations"]] * 40
    conversations[29] = [{"from": "human", "value": "hi"}, {"from": "assistant_bot", "value": "hello"}]
    return c.data(parquet(c, "s.parquet", {"conversations": conversations}),
                  r"{path}: row 30: message 2: from 'assistant_bot' is no role", validation_split=0.25)


add("test-rows-in-a-chat-shape-for-a-raw-run", lambda c: Bad(c.run(
    test_dataset=str(write_jsonl(c.tmp / "chat-test.jsonl", [GOOD_CHAT])), prompt_format="raw", eval_before=True),
    r"test rows .*chat-test\.jsonl: messages rows are conversations in the chat template, and this run trains raw "
    r"prompts"))
add("config-unknown-format", lambda c: Bad(c.run(format="chatml"), r"format: .*'chatml'"))
add("config-role-mapped-to-no-role", lambda c: Bad(c.run(roles={"bot": "robot"}), r"roles\.bot: .*'robot'"))
add("list-entry-misspelled-role-key", lambda c: Bad(c.run(dataset_name=[{"name": "a.jsonl", "role_keys": "from"}]),
                                                    r"entry 1 \(a\.jsonl\): unknown key 'role_keys' \(did you mean "
                                                    r"'role_key'\?\)"))

@case("parquet-null-completion-named-by-its-row-after-the-validation-split")
def _(c):
    rows = [dict(r) for r in c.rows]
    rows[29]["completion"] = None  # no line scan for parquet: the row number must survive the shuffle of the split
    path = parquet(c, "split.parquet", {"prompt": [r["prompt"] for r in rows],
                                        "completion": [r["completion"] for r in rows]})
    return c.data(path, r"{path}: row 30\b.*'completion'", validation_split=0.25)


# --- dataset lists: each bad entry named by its position and name ---------------------------------------------------

add("no-dataset-at-all", lambda c: Bad(c.run(dataset_name=None), r"dataset_name is not set"))
add("list-entry-missing-file", lambda c: Bad(
    c.run(dataset_name=[str(c.good), str(c.tmp / "gone.jsonl")]),
    rf"not found: {re.escape(str(c.tmp / 'gone.jsonl'))} \(dataset_name entry 2\)"))
add("list-entry-without-the-needed-fields", lambda c: Bad(
    c.run(dataset_name=[str(c.good), str(write_jsonl(c.tmp / "qa.jsonl", [{"q": 1, "a": 2}] * 5))]),
    r"qa\.jsonl \(dataset_name entry 2\)"))
add("list-entry-negative-weight", lambda c: Bad(c.run(dataset_name=[{"name": "a.jsonl", "weight": 1},
                                                                   {"name": "b.jsonl", "weight": -1}]),
                                                r"dataset_name: entry 2 \(b\.jsonl\): weight: .*-1"))
add("list-entry-weight-not-a-number", lambda c: Bad(c.run(dataset_name=[{"name": "a.jsonl", "weight": "heavy"}]),
                                                    r"dataset_name: entry 1 \(a\.jsonl\): weight: .*'heavy'"))
add("list-entry-weight-true", lambda c: Bad(c.run(dataset_name=[{"name": "a.jsonl", "weight": True}]),
                                            r"entry 1 \(a\.jsonl\): weight: expected a number"))
add("list-every-weight-zero", lambda c: Bad(c.run(dataset_name=[{"name": "a.jsonl", "weight": 0},
                                                               {"name": "b.jsonl", "weight": 0}]),
                                            r"dataset_name: every weight is 0"))
add("list-weight-on-some-entries", lambda c: Bad(c.run(dataset_name=["a.jsonl", {"name": "b.jsonl", "weight": 2}]),
                                                 r"dataset_name: set a weight on every entry or on none"))
add("list-entry-unknown-key", lambda c: Bad(c.run(dataset_name=[{"name": "a.jsonl", "wieght": 2}]),
                                            r"entry 1 \(a\.jsonl\): unknown key 'wieght' \(did you mean 'weight'\?\)"))
add("list-entry-without-name", lambda c: Bad(c.run(dataset_name=[{"weight": 2}]), r"dataset_name: entry 1: .*name"))
add("list-empty", lambda c: Bad(c.run(dataset_name=[]), r"dataset_name: .*non-empty list"))
add("test-list-entry-with-weight", lambda c: Bad(c.run(test_dataset=[{"name": "t.jsonl", "weight": 2}]),
                                                 r"test_dataset: weight"))


# --- model paths ---------------------------------------------------------------------------------------------------

def model_folder(c: Ctx, name: str, files: dict[str, str] | None = None, copy: tuple[str, ...] = ()) -> str:
    """A folder in place of a model: empty, or holding the given files and copies of the tiny model's."""
    path = c.tmp / name
    path.mkdir()
    for f in copy:
        shutil.copy(c.model / f, path / f)
    for f, content in (files or {}).items():
        (path / f).write_text(content)
    return str(path)


def model_case(c: Ctx, name: str, **env) -> Bad:
    return Bad(c.run(model_name=name), rf"model_name.*{re.escape(name)}", env=env)


add("model-missing-folder", lambda c: model_case(c, str(c.tmp / "no-such-model")))
add("model-gguf-missing", lambda c: model_case(c, str(c.tmp / "model-Q4_K_M.gguf")))
add("model-empty-folder", lambda c: model_case(c, model_folder(c, "empty-model")))
add("model-garbage-config-json",
    lambda c: model_case(c, model_folder(c, "garbage-model", {"config.json": "{not json"})))
add("model-file-not-folder", lambda c: model_case(c, str(c.model / "config.json")))
add("model-tokenizer-without-weights", lambda c: model_case(c, model_folder(
    c, "no-weights", copy=("config.json", "tokenizer.json", "tokenizer_config.json"))))
add("model-hub-id-offline", lambda c: model_case(c, "someone/nonexistent-model", HF_HUB_OFFLINE="1"))
add("model-unknown-target-module", lambda c: Bad(c.run(peft_target_modules=["nope_proj"]),
                                                  r"peft_target_modules.*nope_proj"))


# --- environment ---------------------------------------------------------------------------------------------------

add("output-dir-used-without-overwrite", lambda c: Bad(c.run(overwrite_output_dir=False),
                                                       rf"output_dir {re.escape(str(c.old_run))} already holds a run"))
add("output-dir-is-a-file", lambda c: Bad(c.run(output_dir=str(c.old_run / "notes.txt")),
                                           r"output_dir .*notes\.txt is a file"))
add("deepspeed-config-missing", lambda c: Bad(c.run(deepspeed=str(c.tmp / "ds.json")),
                                              r"deepspeed: config file not found"))
add("resume-missing-folder", lambda c: Bad(
    c.run(overwrite_output_dir=False, resume_from_checkpoint=str(c.tmp / "checkpoint-9")),
    r"resume_from_checkpoint: .*checkpoint-9"))
add("resume-incomplete-checkpoint", lambda c: Bad(
    c.run(overwrite_output_dir=False, resume_from_checkpoint=str(c.old_run / "checkpoint-2")),
    r"resume_from_checkpoint: .*checkpoint-2 is incomplete"))


@case("output-dir-in-use-by-another-job")
def _(c):
    import fcntl

    handle = (c.old_run / ".lock").open("a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write("pid 4242")
    handle.flush()
    c.keep.append(handle)
    return Bad(c.run(), rf"output_dir {re.escape(str(c.old_run))} is in use.*pid 4242")


add("chat-prompts-without-a-chat-template", lambda c: Bad(c.run(model_name=str(plain_model(c)), prompt_format="chat"),
                                                          r"prompt_format: chat needs .*chat template"))

add("chat-rows-without-a-chat-template", lambda c: Bad(
    c.run(model_name=str(plain_model(c)), dataset_name=str(write_jsonl(c.tmp / "chat.jsonl", [
        chat(("user", "Hi"), ("assistant", "Hello"))] * 8)), prompt_format="raw"),
    r"chat messages need a chat template and this model has none: set chat_template \(chatml, gemma, llama3, qwen"))
add("tools-with-a-template-that-does-not-render-them", lambda c: c.data(write_jsonl(c.tmp / "tools.jsonl", [
    {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}], **GOOD_CHAT}] * 8),
    r"{path}: row \d+: the model's own chat template does not render its tools.*set chat_template to one that does "
    r"\(qwen\)$"))
add("chat-template-unknown-name", lambda c: Bad(c.run(chat_template="gemmma"), (
    r"chat_template: unknown template 'gemmma' \(did you mean 'gemma'\?\); built-in: chatml, gemma, llama3, qwen")))
add("chat-template-file-not-found", lambda c: Bad(c.run(chat_template=str(c.tmp / "mine.jinja")),
                                                  r"chat_template: file not found: .*mine\.jinja"))
add("chat-template-for-other-special-tokens", lambda c: Bad(c.run(chat_template="gemma"), (
    r"chat_template: gemma ends the assistant's turn with no special token .*tokenizer.*: chatml, qwen$")))


@case("chat-template-file-that-fails-to-render")
def _(c):
    path = c.tmp / "broken.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}")  # no endfor
    return Bad(c.run(chat_template=str(path)), rf"chat_template: {re.escape(str(path))} fails to render a two-turn "
                                               r"chat \(Unexpected end of template.*endfor")


def plain_model(c: Ctx) -> Path:
    """The tiny model without its chat template."""
    folder = Path(shutil.copytree(c.model, c.tmp / "plain-model"))
    (folder / "chat_template.jinja").unlink()
    return folder


@case("fp16-on-cpu")
def _(c):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid with a CUDA GPU")
    return Bad(c.run(precision="fp16"), r"precision: fp16")


# --- preference rows (stage: dpo, kto) ---------------------------------------------------------------------------

def pairs(n: int = 8, **row) -> list[dict]:
    return [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"{i + 1}", **row} for i in range(n)]


def turns(*pairs_of_role_and_text) -> list[dict]:
    return [{"role": role, "content": text} for role, text in pairs_of_role_and_text]


def labelled(n: int = 8, **row) -> list[dict]:
    return [{"prompt": f"Say {i}.", "completion": f"{i}", "label": i % 2 == 0, **row} for i in range(n)]


PREFERENCE = {
    "dpo-row-missing-rejected": ("dpo", [*pairs(4), {"prompt": "Say 4.", "chosen": "4"}, *pairs(3)],
                                 r"{path}: row 5: 'rejected' is missing; a dpo row needs a prompt and 'chosen' and "
                                 r"'rejected'"),
    "dpo-rows-without-a-rejected-column": ("dpo", [{"prompt": "Say 1.", "chosen": "1"}] * 8,
                                           r"{path}: stage: dpo trains on rows of prompt \+ chosen \+ rejected.*no "
                                           r"'rejected'; rename the columns, or set stage: sft"),
    "dpo-chosen-equal-to-rejected": ("dpo", [*pairs(6), {"prompt": "Say 6.", "chosen": "6", "rejected": "6"}],
                                     r"{path}: row 7: 'chosen' and 'rejected' are the same answer"),
    "dpo-chosen-and-rejected-alike-once-tokenized": (
        "dpo", [*pairs(2), {"prompt": "Say 2.", "chosen": "2", "rejected": "2  "}, *pairs(4)],
        r"{path}: row 3: 'chosen' and 'rejected' are the same once rendered and tokenized"),
    "dpo-prompt-alone-exceeds-seq_length": ("dpo", [*pairs(3), {"prompt": "Say it. " * 40, "chosen": "a",
                                                                "rejected": "b"}],
                                            r"{path}: row 4: its prompt alone fills seq_length=64, so no token of the "
                                            r"answer would be trained; raise seq_length"),
    "dpo-messages-sharing-no-prompt": (
        "dpo", [{"chosen": turns(("user", "Hi"), ("assistant", "Hello")),
                 "rejected": turns(("user", "Hey"), ("assistant", "Go away"))}] * 4,
        r"{path}: row 1: 'chosen' and 'rejected' share no prompt: their first messages differ"),
    "dpo-text-answers-without-a-prompt": ("dpo", [{"chosen": "yes", "rejected": "no"}] * 4,
                                          r"{path}: row 1: no prompt: give it in a 'prompt' column"),
    "dpo-column-of-text-and-messages": (
        "dpo", [*pairs(2), {"prompt": "Say 2.", "chosen": turns(("assistant", "2")), "rejected": "3"}],
        r"{path}:3: 'chosen' is a list of messages, and row 1's is text: a column holds one kind in every row"),
    "dpo-chosen-a-number": ("dpo", [*pairs(2), {"prompt": "Say 2.", "chosen": 2, "rejected": "3"}],
                            r"{path}:3: 'chosen' is int, expected text or a list of messages"),
    "kto-label-not-a-boolean": ("kto", labelled(4, label="yes"),
                                r"{path}: row 1: 'label' is 'yes' \(str\); a kto row's label is true"),
    "kto-label-a-number": ("kto", labelled(4, label=1), r"{path}: row 1: 'label' is 1 \(int\)"),
    "kto-rows-without-a-label-column": ("kto", [{"prompt": "Say 1.", "completion": "1"}] * 8,
                                        r"{path}: stage: kto trains on rows of prompt \+ completion \+ label.*no "
                                        r"'label'"),
    "kto-row-missing-its-completion": ("kto", [*labelled(2), {"prompt": "Say 2.", "label": True}],
                                       r"{path}: row 3: 'completion' is missing"),
}
for _id, (_stage, _rows, _culprit) in PREFERENCE.items():
    add(_id, lambda c, i=_id, st=_stage, r=_rows, cu=_culprit: c.data(
        write_jsonl(c.tmp / f"{i}.jsonl", r), cu, stage=st, seq_length=64))

add("config-loss-type-unknown", lambda c: Bad(c.run(stage="dpo", loss_type="sigmod"), (
    r"loss_type: 'sigmod' is not a dpo loss \(did you mean 'sigmoid'\?\); known: sigmoid, hinge")))
add("config-loss-type-list-item-unknown", lambda c: Bad(c.run(stage="dpo", loss_type=["sigmoid", "stf"]),
                                                        r"loss_type \(item 2\): 'stf' is not a dpo loss"))
add("config-loss-weights-not-one-per-loss", lambda c: Bad(c.run(stage="dpo", loss_type=["sigmoid", "sft"],
                                                                loss_weights=[1.0]),
                                                          r"loss_weights has 1 weights for 2 losses in loss_type"))
add("config-loss-type-in-the-sft-stage", lambda c: Bad(c.run(loss_type="sigmoid"),
                                                       r"loss_type and loss_weights are for the preference stages"))
add("config-dpo-streaming", lambda c: Bad(c.run(stage="dpo", streaming=True, max_steps=2),
                                          r"stage: dpo computes the reference .* set streaming: false"))
add("config-dpo-with-a-prompt-loss-weight", lambda c: Bad(c.run(stage="dpo", prompt_loss_weight=0.1),
                                                         r"prompt_loss_weight .* stage: dpo scores the answers only"))
add("config-kto-beta-zero", lambda c: Bad(c.run(stage="kto", beta=0), r"beta"))
add("preference-test-rows-of-another-shape", lambda c: Bad(c.run(
    stage="dpo", dataset_name=str(write_jsonl(c.tmp / "pairs.jsonl", pairs())), test_dataset=str(c.good)),
    r"train\.jsonl: stage: dpo trains on rows of prompt \+ chosen \+ rejected.*no 'chosen'"))


# --- commands on a finished run, and the other options -------------------------------------------------------------

COMMAND_CASES = {
    "eval-of-no-run": (["eval", "--model", "{tmp}/nowhere"], r"no finished run in .*nowhere"),
    "merge-of-no-run": (["merge", "--model", "{tmp}"], r"no finished run in "),
    "export-of-no-run": (["export", "--model", "{tmp}/nowhere"], r"no finished run in .*nowhere"),
    "generate-from-a-gguf-file": (["generate", "--model", "{run}/gguf/x-q8_0.gguf", "--prompt", "hi"],
                                  r"only eval takes a \.gguf file"),
    "eval-of-a-missing-gguf-file": (["eval", "--model", "{run}/gguf/x-q8_0.gguf"], r"GGUF file not found"),
    "export-of-an-unknown-type": (["export", "--model", "{run}", "--type", "q3_k"],
                                  r"--type: invalid choice: 'q3_k' \(choose from 'f16', .*'q4_k_m', .*'q2_k'\)"),
    "estimate-unreadable-budget": (["--estimate", "lots"], r"--estimate: cannot read the budget 'lots'"),
}
for _id, (_argv, _culprit) in COMMAND_CASES.items():
    add(_id, lambda c, a=_argv, cu=_culprit: Bad([x.format(tmp=c.tmp, run=c.old_run) for x in a], cu))


# ---------------------------------------------------------------------------------------------------------------------
# Running a case and checking the refusal
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def ctx(tmp_path, tiny_model, pc_rows):
    made = Ctx(tmp_path, tiny_model, pc_rows)
    yield made
    for handle in made.keep:
        handle.close()


# Root reads any file, chmod 000 or not; without these two capabilities it reads as its owner, like any user.
WITHOUT_READING_EVERY_FILE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                              "-dac_override,-dac_read_search", sys.executable, str(ROOT / "finetune.py")]


def refusal(bad: Bad, capfd) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the case, run in-process; an unreadable file's case, under root, as a process
    that cannot read it."""
    if bad.unreadable and os.geteuid() == 0:
        done = subprocess.run([*WITHOUT_READING_EVERY_FILE, *bad.argv], capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout, done.stderr
    return run_main(capfd, *bad.argv)


@pytest.mark.parametrize("case_id", CASES)
def test_bad_input_is_refused_in_one_line_and_leaves_output_dir_alone(case_id, ctx, capfd, monkeypatch):
    bad = CASES[case_id](ctx)
    for name, value in bad.env.items():
        offline(monkeypatch) if name == "HF_HUB_OFFLINE" else monkeypatch.setenv(name, value)
    before = snapshot(ctx.old_run)
    assert_one_line_error(*refusal(bad, capfd), bad.culprit)
    assert snapshot(ctx.old_run) == before


# The same refusals from a user's shell: the real entry point, its re-exec and its environment.
SUBPROCESS_CASES = ["yaml-broken-bracket", "override-bad-type", "option-unknown", "config-learning_rate-not-a-number",
                    "jsonl-broken-line-in-the-middle-of-20000", "data-hub-id-offline", "output-dir-is-a-file",
                    "list-entry-unknown-key", "eval-of-no-run"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_is_refused_from_the_shell(case_id, ctx):
    bad = CASES[case_id](ctx)
    before = snapshot(ctx.old_run)
    done = run_cli(*bad.argv, cwd=ctx.tmp, env=bad.env, timeout=120)
    assert_one_line_error(done.returncode, done.stdout, done.stderr, bad.culprit)
    assert snapshot(ctx.old_run) == before


# ---------------------------------------------------------------------------------------------------------------------
# Inputs that are not refused, by design
# ---------------------------------------------------------------------------------------------------------------------

def train(tmp_path: Path, model: Path, data: Path, capfd, *overrides: str) -> tuple[int, str, str]:
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(dict(ONE_STEP, model_name=str(model), dataset_name=str(data),
                                          output_dir=str(tmp_path / "out"))))
    code, out, err = run_main(capfd, "--config", str(config), *overrides)
    assert "Traceback" not in out + err, err
    return code, out, err


@pytest.mark.parametrize("mode, kept", [("truncate", 49), ("drop", 48)])
def test_enormous_example_is_cut_or_dropped_and_counted(tmp_path, tiny_model, pc_rows, capfd, mode, kept):
    huge = {"prompt": "Write the longest answer you can.", "completion": " word" * 40_000}
    data = write_jsonl(tmp_path / "enormous.jsonl", pc_rows[:24] + [huge] + pc_rows[24:])
    code, out, err = train(tmp_path, tiny_model, data, capfd, "seq_length=256", f"long_examples={mode}")
    assert code == 0, err
    assert re.search(rf"1 training examples are longer than seq_length=256: {mode}d", out), out
    assert re.search(rf"\b{kept} training examples\b", out), out
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_tokenizer_without_pad_token_trains(tmp_path, tiny_model, pc_file, capfd):
    folder = shutil.copytree(tiny_model, tmp_path / "no-pad-model")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    code, out, err = train(tmp_path, folder, pc_file, capfd, "batch_size=8")
    assert code == 0, err
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_push_without_hf_token_refuses_after_saving_locally(tmp_path, tiny_model, pc_file, capfd, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    code, out, err = train(tmp_path, tiny_model, pc_file, capfd, "push_to_hub=true", "hub_model_id=someone/tiny")
    saved = re.escape(str(tmp_path / "out"))
    assert "Traceback" not in err  # the training before it logs to stderr, so its last line is the refusal
    assert_one_line_error(code, "", err.splitlines()[-1], rf"push_to_hub: .*HF_TOKEN.*{saved}")
    assert (tmp_path / "out" / "result.json").is_file()
