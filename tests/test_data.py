"""Data: reading rows from files and folders, tokenizing each format with per-token loss weights, long examples,
train/validation split, the collator and the generation test pairs. Real files on disk, the real SmolLM2 tokenizer."""

import json
import re
from pathlib import Path

import pytest

import finetune
from conftest import DEMO_TRAIN, write_jsonl


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------

DEMO = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:6]]  # real prompt/completion rows


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return finetune.load_tokenizer(finetune.Config(model_name=str(tiny_model), eval_strategy="no"))


def tokenize_file(path: Path, tokenizer, cfg):
    """read_rows + tokenize_dataset as the trainer calls them: (rows as dicts, number of long rows)."""
    dataset, too_long = finetune.tokenize_dataset(finetune.read_rows(str(path), text_fields=finetune.text_fields(cfg)), tokenizer, cfg, str(path))
    return dataset.to_list(), too_long


def runs(tokenizer, ids, weights, trained: bool) -> list[str]:
    """The decoded text of each maximal run of tokens whose weight is 1 (trained=True) or is not 1 (trained=False)."""
    pieces, current = [], []
    for token, weight in zip(ids, weights):
        if (weight == 1.0) == trained:
            current.append(token)
        elif current:
            pieces.append(current)
            current = []
    if current:
        pieces.append(current)
    return [tokenizer.decode(p) for p in pieces]


def end_of_turn(tokenizer) -> str:
    """What the chat template writes right after a message's content (for SmolLM2: '<|im_end|>\\n')."""
    marker = "SENTINEL-CONTENT-7f3a"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return rendered[rendered.index(marker) + len(marker):]


def pc_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    return (tokenizer(prompt)["input_ids"],
            tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])


def chat(*turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# ---------------------------------------------------------------------------------------------------------------------
# 1. formats
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("plw", [0.0, 0.1])
def test_prompt_completion_is_prompt_then_completion_then_eos(pc_file, pc_rows, tokenizer, make_cfg, plw):
    examples, too_long = tokenize_file(pc_file, tokenizer, make_cfg(prompt_loss_weight=plw))
    assert too_long == 0
    assert len(examples) == len(pc_rows)
    for example, row in zip(examples, pc_rows):
        prompt, completion = pc_ids(tokenizer, row["prompt"], row["completion"])
        assert example["input_ids"] == prompt + completion
        assert example["loss_weights"] == pytest.approx([plw] * len(prompt) + [1.0] * len(completion))
        assert example["length"] == len(prompt) + len(completion)


@pytest.mark.parametrize("plw", [0.0, 0.1])
def test_prompt_completion_trained_tokens_decode_to_completion_and_eos(pc_file, pc_rows, tokenizer, make_cfg, plw):
    examples, _ = tokenize_file(pc_file, tokenizer, make_cfg(prompt_loss_weight=plw))
    for example, row in zip(examples, pc_rows):
        assert runs(tokenizer, example["input_ids"], example["loss_weights"], trained=True) == \
            [row["completion"] + tokenizer.eos_token]
        assert runs(tokenizer, example["input_ids"], example["loss_weights"], trained=False) == [row["prompt"]]


@pytest.mark.parametrize("plw", [0.0, 0.1])
def test_chat_trains_assistant_replies_and_nothing_else(chat_file, pc_rows, tokenizer, make_cfg, plw):
    examples, _ = tokenize_file(chat_file, tokenizer, make_cfg(dataset_name=str(chat_file), prompt_loss_weight=plw))
    eot = end_of_turn(tokenizer)
    assert len(examples) == len(pc_rows)
    for example, row in zip(examples, pc_rows):
        messages = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["completion"].strip()}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        ids, weights = example["input_ids"], example["loss_weights"]
        assert tokenizer.decode(ids) == full
        reply = row["completion"].strip() + eot
        assert runs(tokenizer, ids, weights, trained=True) == [reply]
        untrained = "".join(runs(tokenizer, ids, weights, trained=False))
        assert untrained == full.replace(reply, "")
        assert row["prompt"] in untrained
        assert [w for w in weights if w != 1.0] == pytest.approx([plw] * sum(w != 1.0 for w in weights))


CONVERSATIONS = {
    "one turn": [("user", "What is 2+2?"), ("assistant", "4")],
    "two turns": [("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another?"), ("assistant", "Green.")],
    "two turns of demo rows": [("user", DEMO[0]["prompt"]), ("assistant", DEMO[0]["completion"].strip()),
                               ("user", DEMO[1]["prompt"]), ("assistant", DEMO[1]["completion"].strip())],
    "system prompt": [("system", "Answer in French."), ("user", "Hello"), ("assistant", "Bonjour")],
    "three turns with system": [("system", "Be brief."), ("user", "a"), ("assistant", "b"), ("user", "c"),
                                ("assistant", "d"), ("user", "e"), ("assistant", "f")],
    "trailing user turn": [("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")],
}


def test_conversation_opening_with_an_assistant_turn_is_a_user_error(tmp_path, tokenizer, make_cfg):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(("user", "Hi"), ("assistant", "Hello")),
                                                  chat(("assistant", "How can I help?"), ("user", "Joke?"), ("assistant", "No."))])
    with pytest.raises(finetune.UserError, match=r"row 2\b.*starts with an assistant"):
        tokenize_file(path, tokenizer, make_cfg(dataset_name=str(path)))


@pytest.mark.parametrize("turns", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_chat_trains_every_assistant_reply(tmp_path, tokenizer, make_cfg, turns):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(*turns)])
    (example,), _ = tokenize_file(path, tokenizer, make_cfg(dataset_name=str(path)))
    eot = end_of_turn(tokenizer)
    replies = [content + eot for role, content in turns if role == "assistant"]
    assert runs(tokenizer, example["input_ids"], example["loss_weights"], trained=True) == replies
    untrained = "".join(runs(tokenizer, example["input_ids"], example["loss_weights"], trained=False))
    for role, content in turns:
        if role != "assistant":
            assert content in untrained


def test_plain_text_trains_every_token_and_ends_with_eos(tmp_path, pc_rows, tokenizer, make_cfg):
    texts = [r["prompt"] + r["completion"] for r in pc_rows]
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    examples, _ = tokenize_file(path, tokenizer, make_cfg(dataset_name=str(path), prompt_loss_weight=0.1))
    assert len(examples) == len(texts)
    for example, text in zip(examples, texts):
        assert example["input_ids"] == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        assert example["input_ids"][-1] == tokenizer.eos_token_id
        assert example["loss_weights"] == [1.0] * len(example["input_ids"])


RENAMED = {
    "prompt/completion": (lambda r: {"question": r["prompt"], "answer": r["completion"], "id": 1},
                          dict(prompt_field="question", completion_field="answer"),
                          lambda r: {"prompt": r["prompt"], "completion": r["completion"]}),
    "text": (lambda r: {"body": r["prompt"] + r["completion"], "source": "demo"},
             dict(dataset_text_field="body"),
             lambda r: {"text": r["prompt"] + r["completion"]}),
    "messages": (lambda r: {"conversation": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["completion"]}]},
                 dict(messages_field="conversation"),
                 lambda r: chat(("user", r["prompt"]), ("assistant", r["completion"]))),
}


@pytest.mark.parametrize("renamed, fields, standard", RENAMED.values(), ids=RENAMED.keys())
def test_custom_field_names_tokenize_like_the_standard_names(tmp_path, pc_rows, tokenizer, make_cfg, renamed, fields,
                                                             standard):
    custom = write_jsonl(tmp_path / "custom.jsonl", [renamed(r) for r in pc_rows[:8]])
    plain = write_jsonl(tmp_path / "plain.jsonl", [standard(r) for r in pc_rows[:8]])
    got, _ = tokenize_file(custom, tokenizer, make_cfg(dataset_name=str(custom), prompt_loss_weight=0.1, **fields))
    want, _ = tokenize_file(plain, tokenizer, make_cfg(dataset_name=str(plain), prompt_loss_weight=0.1))
    assert got == want
    assert any(w == 1.0 for e in got for w in e["loss_weights"])


# ---------------------------------------------------------------------------------------------------------------------
# 2. file types
# ---------------------------------------------------------------------------------------------------------------------

def as_jsonl(folder: Path, rows):
    return write_jsonl(folder / "rows.jsonl", rows)


def as_json_array(folder: Path, rows):
    path = folder / "rows.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def as_csv(folder: Path, rows):
    import pandas as pd

    path = folder / "rows.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def as_parquet(folder: Path, rows):
    import pandas as pd

    path = folder / "rows.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def as_folder_of_two_jsonl(folder: Path, rows):
    data = folder / "shards"
    data.mkdir()
    write_jsonl(data / "part-0.jsonl", rows[:20])
    write_jsonl(data / "part-1.jsonl", rows[20:])
    (data / "README.md").write_text("not data")
    return data


@pytest.mark.parametrize("writer", [as_jsonl, as_json_array, as_csv, as_parquet, as_folder_of_two_jsonl],
                         ids=["jsonl", "json", "csv", "parquet", "folder"])
def test_every_file_type_loads_the_same_rows(tmp_path, pc_rows, writer):
    path = writer(tmp_path, pc_rows)
    rows = finetune.read_rows(str(path))
    assert sorted(rows.column_names) == ["completion", "prompt"]
    key = lambda r: json.dumps(r, sort_keys=True)
    assert sorted(map(key, rows.to_list())) == sorted(map(key, pc_rows))


# ---------------------------------------------------------------------------------------------------------------------
# 3. bad data: one clear UserError naming the culprit
# ---------------------------------------------------------------------------------------------------------------------

def lines_file(name: str, lines: list[bytes]):
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(b"".join(line + b"\n" for line in lines))
        return path
    return make


def rows_file(rows: list, name: str = "data.jsonl"):
    return lambda tmp: write_jsonl(tmp / name, rows)


def folder_with(*names: str):
    def make(tmp: Path) -> Path:
        folder = tmp / "dataset"
        folder.mkdir()
        for name in names:
            (folder / name).write_text("prompt,completion\na,b\n")
        return folder
    return make


def empty_file(name: str, content: bytes = b""):
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(content)
        return path
    return make


GOOD = [{"prompt": f"Say {i}.", "completion": f" {i}"} for i in range(10000)]
GOOD_LINES = [json.dumps(r).encode() for r in GOOD]
GOOD_CHAT = chat(("user", "hi"), ("assistant", "hello"))
BROKEN_5000 = GOOD_LINES[:4999] + [b'{"prompt": "x", "completion": '] + GOOD_LINES[5000:]
LIST_ON_3 = GOOD_LINES[:2] + [b'["prompt", "completion"]'] + GOOD_LINES[3:6]
LATIN1_ON_7 = GOOD_LINES[:6] + ['{"prompt": "caf\u00e9", "completion": " x"}'.encode("latin-1")] + GOOD_LINES[7:9]
LONG_ONLY = [{"prompt": f"Please repeat the number {i} three times.", "completion": f" {i} {i} {i}"} for i in range(3)]
PATH = "{path}"  # stands for the culprit's path in the expected patterns
ROLE_CONTENT = "role.*content"

BAD_DATA = {  # id: (make the file in tmp_path, config overrides, patterns the message must match)
    "missing file": (lambda tmp: tmp / "no_such_file.jsonl", {}, [PATH, "not found"]),
    "missing folder": (lambda tmp: tmp / "no" / "such" / "folder", {}, [PATH, "not found"]),
    "empty folder": (folder_with(), {}, [PATH, r"\.jsonl"]),
    "folder of unsupported files": (folder_with("notes.txt", "table.tsv"), {}, [PATH, r"\.jsonl"]),
    "unsupported file type": (empty_file("data.txt", b"prompt\tcompletion\n"), {}, [PATH, r"\.txt"]),
    "broken line 5000 of 10000": (lines_file("big.jsonl", BROKEN_5000), {}, [PATH + r":5000\b", "JSON"]),
    "line that is a JSON list": (lines_file("list.jsonl", LIST_ON_3), {}, [PATH + r":3\b", "object", "list"]),
    "non-UTF-8 bytes on line 7": (lines_file("latin1.jsonl", LATIN1_ON_7), {}, [PATH + r":7\b", "UTF-8"]),
    "rows without the expected fields": (rows_file([{"question": "a", "answer": "b"}] * 3), {},
                                         ["'answer'", "'question'", "'prompt'", "'completion'"]),
    "null completion on row 3": (rows_file(DEMO[:2] + [{"prompt": "x", "completion": None}] + DEMO[2:]), {},
                                 [PATH, r"(row |:)3\b", "completion"]),
    "number completion on row 3": (rows_file(DEMO[:2] + [{"prompt": "x", "completion": 42}] + DEMO[2:]), {},
                                   [PATH, r"(row |:)3\b", "completion"]),
    "number prompt on row 1": (rows_file([{"prompt": 7, "completion": "x"}] + GOOD[:3]), {},
                               [PATH, r"(row |:)1\b", "prompt"]),
    "null text on row 2": (rows_file([{"text": "a"}, {"text": None}]), {}, [PATH, r"(row |:)2\b", "text"]),
    "empty .jsonl": (empty_file("empty.jsonl"), {}, [PATH, "empty|no rows"]),
    "blank lines only .jsonl": (empty_file("blank.jsonl", b"\n  \n\n"), {}, [PATH, "empty|no rows"]),
    "empty .json": (empty_file("empty.json"), {}, [PATH, "empty|no rows"]),
    "empty JSON array": (empty_file("empty.json", b"[]"), {}, [PATH, "empty|no rows"]),
    "empty .csv": (empty_file("empty.csv"), {}, [PATH, "empty|no rows"]),
    "header-only .csv": (empty_file("header.csv", b"prompt,completion\n"), {}, [PATH, "empty|no rows"]),
    "empty after dropping long rows": (rows_file(LONG_ONLY), dict(seq_length=8, long_examples="drop"),
                                       [PATH, "seq_length"]),
    "messages is a string": (rows_file([GOOD_CHAT, {"messages": "user: hi"}]), {}, [PATH, r"row 2\b", ROLE_CONTENT]),
    "messages is a list of strings": (rows_file([GOOD_CHAT, {"messages": ["hi", "hello"]}]), {},
                                      [PATH, r"row 2\b", ROLE_CONTENT]),
    "message without content": (rows_file([GOOD_CHAT, {"messages": [{"role": "user"},
                                                                    {"role": "assistant", "content": "x"}]}]), {},
                                [PATH, r"row 2\b", ROLE_CONTENT]),
    "message without role": (rows_file([GOOD_CHAT, {"messages": [{"content": "hi"},
                                                                 {"role": "assistant", "content": "x"}]}]), {},
                             [PATH, r"row 2\b", ROLE_CONTENT]),
    "message with null content": (rows_file([GOOD_CHAT, {"messages": [{"role": "user", "content": None},
                                                                      {"role": "assistant", "content": "x"}]}]), {},
                                  [PATH, r"row 2\b", "content"]),
    "conversation without assistant": (rows_file([GOOD_CHAT, chat(("system", "s"), ("user", "a"), ("user", "b"))]), {},
                                       [PATH, r"row 2\b", "assistant"]),
}


@pytest.mark.parametrize("make, overrides, patterns", BAD_DATA.values(), ids=BAD_DATA.keys())
def test_bad_data_is_a_user_error_naming_the_culprit(tmp_path, tokenizer, make_cfg, make, overrides, patterns):
    path = make(tmp_path)
    cfg = make_cfg(dataset_name=str(path), **overrides)
    with pytest.raises(finetune.UserError) as raised:
        finetune.tokenize_dataset(finetune.read_rows(str(path), text_fields=finetune.text_fields(cfg)), tokenizer, cfg, str(path))
    message = str(raised.value)
    for pattern in patterns:
        if PATH in pattern:
            assert re.search(pattern.replace(PATH, re.escape(str(path))), message), f"{pattern!r} not in {message!r}"
        else:  # the words must be the message's own, not part of the file's name
            assert re.search(pattern, message.replace(str(path), "<path>")), f"{pattern!r} not in {message!r}"


def test_bad_row_is_named_by_its_row_in_the_file_after_the_validation_split(tmp_path, pc_rows, tokenizer, make_cfg):
    """load_dataset_splits shuffles; the message must still point at the row of the file, not at its shuffled place."""
    import pandas as pd

    rows = [dict(r) for r in pc_rows]
    rows[29]["completion"] = None
    path = tmp_path / "train.parquet"  # no line scan for parquet: the row number must survive the split
    pd.DataFrame(rows).to_parquet(path)
    cfg = make_cfg(dataset_name=str(path), validation_split=0.25)
    train, val = finetune.load_dataset_splits(cfg)
    culprit = train if None in train["completion"] else val
    with pytest.raises(finetune.UserError, match=r"row 30\b"):
        finetune.tokenize_dataset(culprit, tokenizer, cfg, cfg.dataset_name)


# ---------------------------------------------------------------------------------------------------------------------
# 4. seq_length and long_examples
# ---------------------------------------------------------------------------------------------------------------------

SEQ = 72  # the 48 demo rows are 62..85 tokens long, their prompts at most 38: some are long, none loses its completion


def full_examples(tokenizer, pc_rows, plw):
    out = []
    for row in pc_rows:
        prompt, completion = pc_ids(tokenizer, row["prompt"], row["completion"])
        out.append((prompt + completion, [plw] * len(prompt) + [1.0] * len(completion)))
    return out


@pytest.mark.parametrize("plw", [0.0, 0.1])
def test_truncate_cuts_long_examples_to_seq_length(pc_file, pc_rows, tokenizer, make_cfg, plw):
    full = full_examples(tokenizer, pc_rows, plw)
    expected_long = sum(len(ids) > SEQ for ids, _ in full)
    assert 0 < expected_long < len(full)
    examples, too_long = tokenize_file(pc_file, tokenizer, make_cfg(seq_length=SEQ, long_examples="truncate",
                                                                    prompt_loss_weight=plw))
    assert too_long == expected_long
    assert len(examples) == len(full)
    for example, (ids, weights) in zip(examples, full):
        assert example["input_ids"] == ids[:SEQ]
        assert example["loss_weights"] == pytest.approx(weights[:SEQ])
        assert example["length"] == len(ids)  # the length before the cut, as --validate reports it


def test_drop_removes_exactly_the_long_examples(pc_file, pc_rows, tokenizer, make_cfg):
    full = full_examples(tokenizer, pc_rows, 0.0)
    kept = [ids for ids, _ in full if len(ids) <= SEQ]
    examples, too_long = tokenize_file(pc_file, tokenizer, make_cfg(seq_length=SEQ, long_examples="drop"))
    assert too_long == len(full) - len(kept)
    assert [e["input_ids"] for e in examples] == kept


def test_examples_within_seq_length_are_untouched(pc_file, pc_rows, tokenizer, make_cfg):
    longest = max(len(ids) for ids, _ in full_examples(tokenizer, pc_rows, 0.0))
    for mode in ("truncate", "drop"):
        examples, too_long = tokenize_file(pc_file, tokenizer, make_cfg(seq_length=longest, long_examples=mode))
        assert too_long == 0
        assert len(examples) == len(pc_rows)
        assert max(e["length"] for e in examples) == longest


# ---------------------------------------------------------------------------------------------------------------------
# 5. train/validation split
# ---------------------------------------------------------------------------------------------------------------------

def keys(rows) -> list[str]:
    """The rows' content, without the row-number column the split adds for error messages."""
    return sorted(json.dumps({k: v for k, v in r.items() if k != finetune.ROW}, sort_keys=True) for r in rows.to_list())


def test_validation_split_holds_out_a_quarter_disjointly(pc_rows, make_cfg):
    train, val = finetune.load_dataset_splits(make_cfg(validation_split=0.25))
    assert (len(train), len(val)) == (36, 12)
    assert not set(keys(train)) & set(keys(val))
    assert sorted(keys(train) + keys(val)) == sorted(json.dumps(r, sort_keys=True) for r in pc_rows)


def test_split_depends_on_the_seed_only(make_cfg):
    first = finetune.load_dataset_splits(make_cfg(validation_split=0.25, seed=1))
    again = finetune.load_dataset_splits(make_cfg(validation_split=0.25, seed=1))
    other = finetune.load_dataset_splits(make_cfg(validation_split=0.25, seed=2))
    assert keys(first[1]) == keys(again[1])
    assert keys(first[1]) != keys(other[1])


def test_validation_split_zero_returns_all_rows_and_none(pc_rows, make_cfg):
    train, val = finetune.load_dataset_splits(make_cfg(validation_split=0))
    assert val is None
    assert train.remove_columns(finetune.ROW).to_list() == pc_rows


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_too_few_rows_to_split_is_a_user_error(tmp_path, pc_rows, make_cfg, fraction):
    path = write_jsonl(tmp_path / "one.jsonl", pc_rows[:1])
    with pytest.raises(finetune.UserError, match=r"1 rows.*validation_split"):
        finetune.load_dataset_splits(make_cfg(dataset_name=str(path), validation_split=fraction))


def test_two_rows_split_in_half(tmp_path, pc_rows, make_cfg):
    path = write_jsonl(tmp_path / "two.jsonl", pc_rows[:2])
    train, val = finetune.load_dataset_splits(make_cfg(dataset_name=str(path), validation_split=0.5))
    assert sorted(keys(train) + keys(val)) == sorted(json.dumps(r, sort_keys=True) for r in pc_rows[:2])
    assert len(train) == len(val) == 1


# ---------------------------------------------------------------------------------------------------------------------
# 6. collate
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def examples(pc_file, tokenizer, make_cfg):
    """Three real tokenized examples of different lengths whose first token has a nonzero weight."""
    tokenized, _ = tokenize_file(pc_file, tokenizer, make_cfg(prompt_loss_weight=0.1))
    chosen = [tokenized[0], tokenized[5], tokenized[11]]
    assert len({e["length"] for e in chosen}) > 1
    assert all(e["loss_weights"][0] > 0 for e in chosen)
    return chosen


def test_padding_free_puts_all_examples_in_one_row(examples, tokenizer):
    batch = finetune.collate(examples, tokenizer.pad_token_id, padding_free=True)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].tolist() == [sum((e["input_ids"] for e in examples), [])]
    assert batch["position_ids"].tolist() == [[p for n in lengths for p in range(n)]]
    cumulative = [0] + [sum(lengths[:i + 1]) for i in range(len(lengths))]
    assert batch["cu_seq_lens_q"].tolist() == cumulative
    assert batch["cu_seq_lens_k"].tolist() == cumulative
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
    assert "attention_mask" not in batch


def test_padding_free_never_trains_the_first_token_of_an_example(examples, tokenizer):
    batch = finetune.collate(examples, tokenizer.pad_token_id, padding_free=True)
    weights, labels = batch["loss_weights"][0].tolist(), batch["labels"][0].tolist()
    starts = {sum(len(e["input_ids"]) for e in examples[:i]) for i in range(len(examples))}
    expected = [0.0 if i == 0 else w for e in examples for i, w in enumerate(e["loss_weights"])]
    assert weights == pytest.approx(expected)
    for start in starts:
        assert weights[start] == 0 and labels[start] == -100


@pytest.mark.parametrize("padding_free", [True, False])
def test_labels_are_ignored_exactly_where_the_weight_is_zero(examples, tokenizer, padding_free):
    batch = finetune.collate(examples, tokenizer.pad_token_id, padding_free=padding_free)
    ids, weights, labels = batch["input_ids"].tolist(), batch["loss_weights"].tolist(), batch["labels"].tolist()
    for id_row, weight_row, label_row in zip(ids, weights, labels):
        assert label_row == [-100 if w == 0 else token for token, w in zip(id_row, weight_row)]


def test_padded_batch_pads_on_the_right(examples, tokenizer):
    pad = tokenizer.pad_token_id
    batch = finetune.collate(examples, pad, padding_free=False)
    width = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["loss_weights"].shape == (3, width)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        assert batch["input_ids"][i].tolist() == e["input_ids"] + [pad] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["loss_weights"][i].tolist() == pytest.approx(e["loss_weights"] + [0.0] * (width - n))
        assert batch["labels"][i, n:].tolist() == [-100] * (width - n)
    assert "position_ids" not in batch


# ---------------------------------------------------------------------------------------------------------------------
# 7. test pairs for generation scoring
# ---------------------------------------------------------------------------------------------------------------------

def test_pairs_of_prompt_completion_rows(pc_file, pc_rows, tokenizer, make_cfg):
    pairs = finetune.test_pairs(finetune.read_rows(str(pc_file)), tokenizer, make_cfg())
    assert pairs == [(r["prompt"], r["completion"]) for r in pc_rows]


def test_pairs_of_chat_rows_prompt_with_the_history_before_the_last_reply(tmp_path, pc_rows, tokenizer, make_cfg):
    conversations = [list(turns) for turns in CONVERSATIONS.values()]
    conversations += [[("user", r["prompt"]), ("assistant", r["completion"].strip())] for r in pc_rows[:4]]
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(*turns) for turns in conversations])
    pairs = finetune.test_pairs(finetune.read_rows(str(path)), tokenizer, make_cfg(dataset_name=str(path)))
    assert len(pairs) == len(conversations)
    for (prompt, reference), turns in zip(pairs, conversations):
        last = max(i for i, (role, _) in enumerate(turns) if role == "assistant")
        history = [{"role": role, "content": content} for role, content in turns[:last]]
        assert prompt == tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        assert reference == turns[last][1]


def test_pairs_of_plain_text_rows_are_empty(tmp_path, tokenizer, make_cfg):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "just text"}, {"text": "more"}])
    assert finetune.test_pairs(finetune.read_rows(str(path)), tokenizer, make_cfg(dataset_name=str(path))) == []
