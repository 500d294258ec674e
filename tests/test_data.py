"""Data: each row format tokenized with its per-token loss weights (raw and chat prompts, conversations, plain text),
file types, long examples, the validation split, several datasets mixed by weight, the collator and the test prompts.
Real files on disk and the real SmolLM2 tokenizer. Bad data is refused in test_bad_inputs.py."""

import json
from pathlib import Path

import pytest

import finetune
from helpers import DEMO_TRAIN, assert_one_line_error, chat, logged, plan_for, write_config, write_jsonl

DEMO = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:6]]  # real prompt/completion rows


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return finetune.load_tokenizer(finetune.Config(model_name=str(tiny_model), eval_strategy="no"))


def tokenized(cfg: finetune.Config, tokenizer) -> tuple[list[dict], int]:
    """The training rows of cfg's one dataset as load_data tokenizes them: (rows as dicts, number of long rows)."""
    cfg = cfg.model_copy(update={"validation_split": 0})
    (source,) = finetune.load_sources(cfg)
    rows, too_long = finetune.tokenize_rows(source.train, source, tokenizer, cfg, plan_for(cfg, tokenizer))
    return rows.to_list(), too_long


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


END_OF_TURN = "<|im_end|>"  # what SmolLM2's chat template closes each message with (the newline after is not trained)


def pc_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    return (tokenizer(prompt)["input_ids"],
            tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])


# ---------------------------------------------------------------------------------------------------------------------
# Row formats and prompt formats
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("plw", [0.0, 0.1])
def test_raw_prompt_completion_is_prompt_then_completion_then_eos(make_cfg, pc_rows, tokenizer, plw):
    examples, too_long = tokenized(make_cfg(prompt_loss_weight=plw, prompt_format="raw"), tokenizer)
    assert too_long == 0 and len(examples) == len(pc_rows)
    for example, row in zip(examples, pc_rows):
        prompt, completion = pc_ids(tokenizer, row["prompt"], row["completion"])
        assert example["input_ids"] == prompt + completion
        assert example["loss_weights"] == pytest.approx([plw] * len(prompt) + [1.0] * len(completion))
        assert runs(tokenizer, example["input_ids"], example["loss_weights"], trained=True) == \
            [row["completion"] + tokenizer.eos_token]


@pytest.mark.parametrize("plw", [0.0, 0.1])
def test_chat_prompt_completion_is_a_user_turn_and_the_reply(make_cfg, pc_rows, tokenizer, plw):
    examples, _ = tokenized(make_cfg(prompt_loss_weight=plw, prompt_format="chat"), tokenizer)
    for example, row in zip(examples, pc_rows):
        ids, weights = example["input_ids"], example["loss_weights"]
        assert tokenizer.decode(ids) == (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n{row['completion'].strip()}"
            "<|im_end|>\n")
        assert runs(tokenizer, ids, weights, trained=True) == [row["completion"].strip() + END_OF_TURN]
        assert [w for w in weights if w != 1.0] == pytest.approx([plw] * sum(w != 1.0 for w in weights))


def test_system_prompt_opens_conversations_that_have_none(tmp_path, make_cfg, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [chat(("user", "Hi"), ("assistant", "Hello")),
                                                  chat(("system", "Own system."), ("user", "Hi"), ("assistant", "Yo"))])
    examples, _ = tokenized(make_cfg(dataset_name=str(path), system_prompt="Reply in JSON."), tokenizer)
    first, second = (tokenizer.decode(e["input_ids"]) for e in examples)
    assert first.startswith("<|im_start|>system\nReply in JSON.<|im_end|>\n<|im_start|>user\nHi")
    assert second.startswith("<|im_start|>system\nOwn system.<|im_end|>\n") and "Reply in JSON." not in second


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


@pytest.mark.parametrize("plan_format", ["chat", "raw"])
@pytest.mark.parametrize("turns", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_messages_train_every_assistant_reply_in_either_prompt_format(tmp_path, make_cfg, tokenizer, turns,
                                                                      plan_format):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(*turns)])
    (example,), _ = tokenized(make_cfg(dataset_name=str(path), prompt_format=plan_format), tokenizer)
    replies = [content + END_OF_TURN for role, content in turns if role == "assistant"]
    assert runs(tokenizer, example["input_ids"], example["loss_weights"], trained=True) == replies
    untrained = "".join(runs(tokenizer, example["input_ids"], example["loss_weights"], trained=False))
    assert all(content in untrained for role, content in turns if role != "assistant")


def llama3_tokenizer_model(folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny Llama whose tokenizer is SmolLM2's with Llama 3's special tokens added (BOS <|begin_of_text|>)."""
    from transformers import AutoTokenizer

    from conftest import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.save_pretrained(folder / "tokenizer")
    return tiny_llama(folder / "model", folder / "tokenizer", bos_token_id=tokenizer.bos_token_id)


TWO_TURNS = [("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another?"), ("assistant", "Green.")]
# Each built-in template's rendering of TWO_TURNS, and the runs of tokens it trains: each reply and the special token
# that ends its turn, nothing of the user's turns, the system prompt or the template's own markers.
TEMPLATES = {
    "chatml": ("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"
               "<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\nGreen.<|im_end|>\n",
               ["Blue.<|im_end|>", "Green.<|im_end|>"]),
    "qwen": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"
             "<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\nGreen.<|im_end|>\n",
             ["Blue.<|im_end|>", "Green.<|im_end|>"]),
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nAnother?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nGreen."
               "<|eot_id|>",
               ["Blue.<|eot_id|>", "Green.<|eot_id|>"]),
    "gemma": ("<bos><start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\nBlue.<end_of_turn>\n"
              "<start_of_turn>user\nAnother?<end_of_turn>\n<start_of_turn>model\nGreen.<end_of_turn>\n",
              ["Blue.<end_of_turn>", "Green.<end_of_turn>"]),
}


@pytest.fixture(scope="module")
def template_models(tmp_path_factory, tiny_model, embedded_model, gemma_model):
    """A model whose tokenizer has each template's special tokens: SmolLM2's for ChatML and Qwen, Gemma 3's own."""
    return {"chatml": tiny_model, "qwen": tiny_model, "gemma": gemma_model,
            "llama3": llama3_tokenizer_model(tmp_path_factory.mktemp("llama3"), embedded_model)}


@pytest.mark.parametrize("template", TEMPLATES)
def test_each_built_in_template_trains_the_replies_and_their_end_of_turn_only(tmp_path, make_cfg, template,
                                                                            template_models):
    rendered, trained = TEMPLATES[template]
    cfg = make_cfg(model_name=str(template_models[template]), chat_template=template,
                   dataset_name=str(write_jsonl(tmp_path / "chat.jsonl", [chat(*TWO_TURNS)])))
    tokenizer = finetune.load_tokenizer(cfg)
    (example,), _ = tokenized(cfg, tokenizer)
    assert tokenizer.decode(example["input_ids"]) == rendered
    assert runs(tokenizer, example["input_ids"], example["loss_weights"], trained=True) == trained


def test_plain_text_trains_every_token_and_ends_with_eos(tmp_path, pc_rows, make_cfg, tokenizer):
    texts = [r["prompt"] + r["completion"] for r in pc_rows]
    path = write_jsonl(tmp_path / "text.jsonl", [{"body": t} for t in texts])
    examples, _ = tokenized(make_cfg(dataset_name=str(path), dataset_text_field="body", prompt_loss_weight=0.1),
                            tokenizer)
    assert [e["input_ids"] for e in examples] == [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    assert all(e["loss_weights"] == [1.0] * len(e["input_ids"]) for e in examples)


RENAMED = {
    "prompt/completion": (lambda r: {"question": r["prompt"], "answer": r["completion"], "id": 1},
                          dict(prompt_field="question", completion_field="answer"),
                          lambda r: {"prompt": r["prompt"], "completion": r["completion"]}),
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
    got, _ = tokenized(make_cfg(dataset_name=str(custom), prompt_loss_weight=0.1, **fields), tokenizer)
    want, _ = tokenized(make_cfg(dataset_name=str(plain), prompt_loss_weight=0.1), tokenizer)
    assert got == want and any(w == 1.0 for e in got for w in e["loss_weights"])


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
def test_every_file_type_loads_the_same_rows(tmp_path, make_cfg, pc_rows, writer):
    cfg = make_cfg(dataset_name=str(writer(tmp_path, pc_rows)), validation_split=0)
    (source,) = finetune.load_sources(cfg)
    key = lambda r: json.dumps(r, sort_keys=True)
    assert sorted(map(key, source.train.remove_columns(finetune.ROW).to_list())) == sorted(map(key, pc_rows))


# ---------------------------------------------------------------------------------------------------------------------
# seq_length and long_examples
# ---------------------------------------------------------------------------------------------------------------------

SEQ = 72  # the 48 demo rows are 62..85 tokens long raw, their prompts at most 38: some are long, none loses its answer


def raw_examples(tokenizer, pc_rows):
    return [sum(pc_ids(tokenizer, r["prompt"], r["completion"]), []) for r in pc_rows]


def test_truncate_cuts_long_examples_to_seq_length_and_counts_them(make_cfg, pc_rows, tokenizer):
    full = raw_examples(tokenizer, pc_rows)
    assert 0 < sum(len(ids) > SEQ for ids in full) < len(full)
    examples, too_long = tokenized(make_cfg(seq_length=SEQ, prompt_format="raw"), tokenizer)
    assert too_long == sum(len(ids) > SEQ for ids in full)
    assert [e["input_ids"] for e in examples] == [ids[:SEQ] for ids in full]
    assert [e["length"] for e in examples] == [len(ids) for ids in full]  # before the cut, as --validate reports it


def test_drop_removes_exactly_the_long_examples(make_cfg, pc_rows, tokenizer):
    full = raw_examples(tokenizer, pc_rows)
    examples, too_long = tokenized(make_cfg(seq_length=SEQ, long_examples="drop", prompt_format="raw"), tokenizer)
    assert too_long == sum(len(ids) > SEQ for ids in full)
    assert [e["input_ids"] for e in examples] == [ids for ids in full if len(ids) <= SEQ]


def test_an_example_cut_before_its_answer_is_dropped_and_counted(tmp_path, make_cfg, tokenizer, capsys):
    rows = [{"prompt": "word " * 60, "completion": " answer"}, {"prompt": "short", "completion": " answer"}]
    examples, _ = tokenized(make_cfg(dataset_name=str(write_jsonl(tmp_path / "d.jsonl", rows)), seq_length=32,
                                     prompt_format="raw"), tokenizer)
    assert len(examples) == 1
    assert ("1 example has nothing to learn: 1 with every reply cut away by seq_length=32 (row 1): dropped"
            in capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------------------------------
# Validation split and several datasets
# ---------------------------------------------------------------------------------------------------------------------

def contents(rows) -> list[str]:
    """The rows' content, without the row-number column added for error messages."""
    return sorted(json.dumps({k: v for k, v in r.items() if k != finetune.ROW}, sort_keys=True) for r in rows.to_list())


def test_validation_split_holds_out_a_quarter_disjointly(pc_rows, make_cfg):
    (source,) = finetune.load_sources(make_cfg(validation_split=0.25))
    assert (len(source.train), len(source.validation)) == (36, 12)
    assert sorted(contents(source.train) + contents(source.validation)) == sorted(
        json.dumps(r, sort_keys=True) for r in pc_rows)


def test_the_split_depends_on_the_seed_only(make_cfg):
    first, again, other = (finetune.load_sources(make_cfg(validation_split=0.25, seed=seed))[0] for seed in (1, 1, 2))
    assert contents(first.validation) == contents(again.validation) != contents(other.validation)


def test_validation_split_zero_trains_on_every_row(pc_rows, make_cfg):
    (source,) = finetune.load_sources(make_cfg(validation_split=0))
    assert source.validation is None and source.train.remove_columns(finetune.ROW).to_list() == pc_rows


@pytest.fixture
def two_files(tmp_path, pc_rows):
    first = write_jsonl(tmp_path / "first.jsonl", pc_rows[:40])
    second = write_jsonl(tmp_path / "second.jsonl", [chat(("user", r["prompt"]), ("assistant", r["completion"]))
                                                     for r in pc_rows[:40]])
    return first, second


def load(cfg, tokenizer):
    return finetune.load_data(cfg, plan_for(cfg, tokenizer), tokenizer, finetune.load_sources(cfg))


def test_weights_3_to_1_give_three_quarters_of_the_training_examples_to_the_first(two_files, make_cfg, tokenizer):
    first, second = two_files
    cfg = make_cfg(dataset_name=[{"name": str(first), "weight": 3}, {"name": str(second), "weight": 1}],
                   validation_split=0.25, prompt_format="raw")
    data = load(cfg, tokenizer)
    from_first = sum(tokenizer.decode(e["input_ids"]).startswith("Convert") for e in data.train)
    assert len(data.train) == 60 and from_first == 45  # 30 + 30 rows per epoch, shared 3:1
    validation = [tokenizer.decode(e["input_ids"]) for e in data.validation]
    assert sum(v.startswith("Convert") for v in validation) == 10 and len(validation) == 20  # from both, unweighted
    assert data.shares == [0.75, 0.25]


def test_without_weights_every_row_of_every_dataset_is_trained_once(two_files, make_cfg, tokenizer):
    first, second = two_files
    data = load(make_cfg(dataset_name=[str(first), str(second)], validation_split=0, prompt_format="raw"), tokenizer)
    assert len(data.train) == 80 and data.shares == [0.5, 0.5]


def test_the_mix_depends_on_the_seed_alone(two_files, make_cfg, tokenizer):
    first, second = two_files
    mixes = [list(load(make_cfg(dataset_name=[{"name": str(first), "weight": 2}, {"name": str(second), "weight": 1}],
                                seed=seed), tokenizer).train["input_ids"]) for seed in (3, 3, 4)]
    assert mixes[0] == mixes[1] != mixes[2]



# ---------------------------------------------------------------------------------------------------------------------
# Agent data: tools, tool calls, tool results and reasoning traces
# ---------------------------------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_ROW = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                           "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": '{"celsius": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."}]}
THOUGHT_ROW = chat(("user", "What is 2+2?"), ("assistant", "<think>Two and two make four.</think>4"))


def test_tool_calls_are_trained_and_the_tool_list_and_results_are_not(tmp_path, make_cfg, tokenizer):
    cfg = make_cfg(dataset_name=str(write_jsonl(tmp_path / "tools.jsonl", [TOOL_ROW])), chat_template="qwen")
    (example,), _ = tokenized(cfg, finetune.load_tokenizer(cfg))
    ids, weights = example["input_ids"], example["loss_weights"]
    assert runs(tokenizer, ids, weights, trained=True) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 degrees in Paris.<|im_end|>"]
    untrained = "".join(runs(tokenizer, ids, weights, trained=False))
    assert '"description": "The weather in a city."' in untrained and '<tool_response>\n{"celsius": 21}' in untrained


@pytest.mark.parametrize("reasoning, shown, trained", [
    ("train", "<think>\nTwo and two make four.\n</think>\n\n4", ["<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>"]),
    ("mask", "<think>\nTwo and two make four.\n</think>\n\n4", ["4<|im_end|>"]),
    ("drop", "4", ["4<|im_end|>"])])
def test_reasoning_is_trained_shown_or_dropped(tmp_path, make_cfg, tokenizer, reasoning, shown, trained):
    cfg = make_cfg(dataset_name=str(write_jsonl(tmp_path / "thought.jsonl", [THOUGHT_ROW])), chat_template="chatml",
                   reasoning=reasoning)
    (example,), _ = tokenized(cfg, finetune.load_tokenizer(cfg))
    assert tokenizer.decode(example["input_ids"]) == (
        f"<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n{shown}<|im_end|>\n")
    assert runs(tokenizer, example["input_ids"], example["loss_weights"], trained=True) == trained


def test_reasoning_content_renders_like_a_think_block(tmp_path, make_cfg, tokenizer):
    as_field = {"messages": [{"role": "user", "content": "What is 2+2?"},
                             {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}]}
    rows = [tokenized(make_cfg(dataset_name=str(write_jsonl(tmp_path / f"{i}.jsonl", [row]))), tokenizer)[0]
            for i, row in enumerate([as_field, THOUGHT_ROW])]
    assert rows[0] == rows[1]


def test_rows_with_and_without_reasoning_get_a_warning_with_the_counts(tmp_path, make_cfg, tokenizer, capsys):
    plain = chat(("user", "What is 3+3?"), ("assistant", "6"))
    tokenized(make_cfg(dataset_name=str(write_jsonl(tmp_path / "mixed.jsonl", [THOUGHT_ROW] * 2 + [plain] * 3))),
              tokenizer)
    assert "2 rows have a reasoning trace and 3 have none" in capsys.readouterr().out


def test_a_tool_call_test_row_is_scored_against_the_call_the_template_writes(tmp_path, make_cfg, tokenizer):
    row = {"tools": [WEATHER], "messages": TOOL_ROW["messages"][:2]}
    cfg = make_cfg(test_dataset=str(write_jsonl(tmp_path / "test.jsonl", [row])), chat_template="qwen")
    qwen = finetune.load_tokenizer(cfg)
    (pair,) = pairs(cfg, qwen)
    assert pair.reference == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert pair.calls == (("get_weather", {"city": "Paris"}),)
    assert qwen.decode(pair.ids) == qwen.apply_chat_template(row["messages"][:1], tools=[WEATHER], tokenize=False,
                                                             add_generation_prompt=True)


def test_tool_call_scores_compare_names_and_parsed_arguments():
    call = (("get_weather", {"city": "Paris", "days": 2}),)
    answers = ['<tool_call>\n{"name": "get_weather", "arguments": {"days": 2, "city": "Paris"}}\n</tool_call>',
               '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon", "days": 2}}</tool_call>',
               '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", </tool_call>',
               '<tool_call>{"name": "get_time", "arguments": {"city": "Paris", "days": 2}}</tool_call>',
               "It is sunny."]
    scores = finetune.score_answers(answers + ["4"], ["ref"] * 5 + ["4"], [call] * 5 + [None])
    assert scores["tool_calls"] == 5
    assert scores["tool_name_accuracy"] == 0.4  # the first two: the third's JSON is cut, so no name can be read
    assert scores["arguments_valid_json"] == 0.6
    assert scores["arguments_exact_match"] == 0.2

# ---------------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def examples(make_cfg, tokenizer):
    """Three real tokenized examples of different lengths whose first token has a nonzero weight."""
    rows, _ = tokenized(make_cfg(prompt_loss_weight=0.1, prompt_format="raw"), tokenizer)
    chosen = [rows[0], rows[5], rows[11]]
    assert len({e["length"] for e in chosen}) > 1 and all(e["loss_weights"][0] > 0 for e in chosen)
    return chosen


def test_padding_free_puts_all_examples_in_one_row(examples, tokenizer):
    batch = finetune.collate(examples, tokenizer.pad_token_id, padding_free=True)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].tolist() == [sum((e["input_ids"] for e in examples), [])]
    assert batch["position_ids"].tolist() == [[p for n in lengths for p in range(n)]]
    cumulative = [0] + [sum(lengths[:i + 1]) for i in range(len(lengths))]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == cumulative
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
    assert "attention_mask" not in batch


def test_padding_free_never_trains_the_first_token_of_an_example(examples, tokenizer):
    batch = finetune.collate(examples, tokenizer.pad_token_id, padding_free=True)
    expected = [0.0 if i == 0 else w for e in examples for i, w in enumerate(e["loss_weights"])]
    assert batch["loss_weights"][0].tolist() == pytest.approx(expected)


@pytest.mark.parametrize("padding_free", [True, False])
def test_labels_are_ignored_exactly_where_the_weight_is_zero(examples, tokenizer, padding_free):
    batch = finetune.collate(examples, tokenizer.pad_token_id, padding_free=padding_free)
    for id_row, weight_row, label_row in zip(batch["input_ids"].tolist(), batch["loss_weights"].tolist(),
                                             batch["labels"].tolist()):
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
    assert "position_ids" not in batch


# ---------------------------------------------------------------------------------------------------------------------
# Shapes as users bring them: Alpaca, ShareGPT, OpenAI fine-tuning rows, field mappings, files as tools write them
# ---------------------------------------------------------------------------------------------------------------------

DATA = Path(finetune.__file__).parent / "data"
ALPACA_ROW = {"system": "Answer in digits.", "history": [["Add 1 and 1.", "2"]], "instruction": "Add the numbers.",
              "input": "2 and 3", "output": "5"}


def one_example(cfg, tokenizer, rows: list[dict], path: Path) -> dict:
    (example,), _ = tokenized(cfg.model_copy(update={"dataset_name": str(write_jsonl(path, rows))}), tokenizer)
    return example


def test_an_alpaca_row_trains_as_the_conversation_it_stands_for(tmp_path, make_cfg, tokenizer):
    cfg = make_cfg(prompt_format="chat")
    example = one_example(cfg, tokenizer, [ALPACA_ROW], tmp_path / "alpaca.jsonl")
    written_out = one_example(cfg, tokenizer, [chat(("system", "Answer in digits."), ("user", "Add 1 and 1."), (
        "assistant", "2"), ("user", "Add the numbers.\n2 and 3"), ("assistant", "5"))], tmp_path / "messages.jsonl")
    assert example == written_out
    assert runs(tokenizer, example["input_ids"], example["loss_weights"], trained=True) == [
        "2" + END_OF_TURN, "5" + END_OF_TURN]
    assert "Add the numbers.\n2 and 3" in "".join(runs(tokenizer, example["input_ids"], example["loss_weights"],
                                                        trained=False))


def test_a_raw_alpaca_row_is_the_alpaca_layout_then_the_output(tmp_path, make_cfg, tokenizer):
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    path = write_jsonl(tmp_path / "a.jsonl", [row, {**row, "input": ""}])
    cfg = make_cfg(prompt_format="raw", dataset_name=str(path))
    with_input, without = tokenized(cfg, tokenizer)[0]
    assert tokenizer.decode(with_input["input_ids"], skip_special_tokens=True) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n"
        "2 and 3\n\n### Response:\n5")
    assert tokenizer.decode(without["input_ids"], skip_special_tokens=True) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n5")
    assert runs(tokenizer, with_input["input_ids"], with_input["loss_weights"], trained=True) == [
        "5" + tokenizer.eos_token]


def test_the_sharegpt_demo_file_trains_as_the_messages_rows_it_was_written_from(make_cfg):
    cfg = make_cfg(chat_template="qwen", seq_length=640)
    qwen = finetune.load_tokenizer(cfg)
    sharegpt, _ = tokenized(cfg.model_copy(update={"dataset_name": str(DATA / "demo_sharegpt_train.parquet")}), qwen)
    messages, _ = tokenized(cfg.model_copy(update={"dataset_name": str(DATA / "demo_tools_train.jsonl")}), qwen)
    assert sharegpt == messages and len(sharegpt) == 300
    answered = next(e for e in sharegpt if "<tool_response>" in qwen.decode(e["input_ids"]))
    trained = runs(qwen, answered["input_ids"], answered["loss_weights"], trained=True)
    assert len(trained) == 2 and trained[0].startswith("<tool_call>\n{") and "<tool_response>" not in "".join(trained)
    assert "<tool_response>" in "".join(runs(qwen, answered["input_ids"], answered["loss_weights"], trained=False))


SHAREGPT_ROW = {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]}


def test_a_sharegpt_conversation_stored_as_columns_of_lists_or_with_blank_tools_reads_as_the_list(tmp_path, make_cfg):
    cfg = make_cfg(chat_template="qwen")
    qwen = finetune.load_tokenizer(cfg)
    as_columns = {"conversations": {"from": ["human", "gpt"], "value": ["Hi.", "Hello."]}}
    expected = one_example(cfg, qwen, [SHAREGPT_ROW], tmp_path / "list.jsonl")
    for i, row in enumerate([as_columns, {**SHAREGPT_ROW, "tools": ""}, {**SHAREGPT_ROW, "tools": "[]"}]):
        assert one_example(cfg, qwen, [row], tmp_path / f"{i}.jsonl") == expected, row


def test_a_reply_with_weight_0_is_shown_but_not_trained(tmp_path, make_cfg, tokenizer):
    row = chat(("user", "Hi."), ("assistant", "Hello."), ("user", "Bye."), ("assistant", "Goodbye."))
    row["messages"][1]["weight"] = 0
    example = one_example(make_cfg(), tokenizer, [row], tmp_path / "weights.jsonl")
    assert runs(tokenizer, example["input_ids"], example["loss_weights"], trained=True) == ["Goodbye." + END_OF_TURN]
    assert "Hello." + END_OF_TURN in tokenizer.decode(example["input_ids"])


def test_sharegpt_turn_weights_as_slimorca_writes_them_train_the_weight_1_replies(tmp_path, make_cfg, tokenizer):
    turns = [("system", "Be brief.", 0.0), ("human", "Hi.", 0.0), ("gpt", "Hello.", 0.0), ("human", "Bye.", 0.0),
             ("gpt", "Goodbye.", 1.0)]
    row = {"conversations": [{"from": who, "value": text, "weight": weight} for who, text, weight in turns]}
    example = one_example(make_cfg(), tokenizer, [row], tmp_path / "slimorca.jsonl")
    assert runs(tokenizer, example["input_ids"], example["loss_weights"], trained=True) == ["Goodbye." + END_OF_TURN]


def test_role_and_content_keys_and_role_names_map_to_the_standard_ones(tmp_path, make_cfg, tokenizer):
    own = {"dialog": [{"speaker": "human", "text": "Hi."}, {"speaker": "bot", "text": "Hello."}]}
    cfg = make_cfg(messages_field="dialog", role_key="speaker", content_key="text",
                   roles={"human": "user", "bot": "assistant"})
    assert one_example(cfg, tokenizer, [own], tmp_path / "own.jsonl") == one_example(
        make_cfg(), tokenizer, [chat(("user", "Hi."), ("assistant", "Hello."))], tmp_path / "standard.jsonl")


def test_the_shape_is_found_from_the_columns_and_forced_with_format(tmp_path, make_cfg):
    both = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "p", "completion": "c", **ALPACA_ROW}] * 2)
    pc_and_conversations = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c", **SHAREGPT_ROW}] * 2)
    found = [finetune.load_sources(make_cfg(dataset_name=str(path)))[0].format for path in (
        both, pc_and_conversations, DATA / "demo_alpaca_test.jsonl", DATA / "demo_sharegpt_test.parquet",
        DATA / "demo_openai_test.jsonl")]
    assert found == ["prompt_completion", "prompt_completion", "alpaca", "sharegpt", "messages"]
    assert finetune.load_sources(make_cfg(dataset_name=[{"name": str(both), "format": "alpaca"}]))[0].format == "alpaca"


def test_a_column_the_shape_leaves_unread_is_named_with_the_rows_that_fill_it(tmp_path, make_cfg, capsys):
    rows = [{"instruction": "Add.", "input": "2 3" if i % 2 else "", "output": "5", "id": i} for i in range(6)]
    finetune.load_sources(make_cfg(dataset_name=str(write_jsonl(tmp_path / "a.jsonl", rows)),
                                   prompt_field="instruction", completion_field="output"))
    out = capsys.readouterr().out
    assert "column 'input' is not used by prompt_completion rows (3 rows have it non-empty; set format: alpaca " \
           "to use it)" in out
    assert "column 'id' is not used by prompt_completion rows (6 rows have it non-empty; no shape of these columns " \
           "reads it)" in out


def test_csv_and_tsv_text_is_read_as_written_and_a_byte_order_mark_is_skipped(tmp_path, make_cfg, tokenizer):
    bom = "\ufeff"
    (tmp_path / "a.csv").write_text(f'{bom}prompt,completion\nSay two.," 2"\nSay NA.,NA\nSay 3.,3\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_text("prompt\tcompletion\nSay two.\t 2\nSay NA.\tNA\nSay 3.\t3\n", encoding="utf-8")
    write_jsonl(tmp_path / "plain.jsonl", rows := [{"prompt": "Say two.", "completion": " 2"}, {
        "prompt": "Say NA.", "completion": "NA"}, {"prompt": "Say 3.", "completion": "3"}])
    (tmp_path / "bom.jsonl").write_text(bom + (tmp_path / "plain.jsonl").read_text(), encoding="utf-8")
    for name in ("a.csv", "a.tsv", "bom.jsonl"):
        (source,) = finetune.load_sources(make_cfg(dataset_name=str(tmp_path / name), validation_split=0))
        assert [{k: r[k] for k in ("prompt", "completion")} for r in source.train] == rows, name


def test_a_date_in_a_message_is_read_as_written(tmp_path, make_cfg):
    rows = [chat(("user", f"Day {i} of March 2024?"), ("assistant", f"2024-03-{i + 1:02d}")) for i in range(6)]
    (source,) = finetune.load_sources(make_cfg(dataset_name=str(write_jsonl(tmp_path / "d.jsonl", rows)),
                                               validation_split=0))
    assert [r["messages"][1]["content"] for r in source.train] == [r["messages"][1]["content"] for r in rows]


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_json_text_that_looks_like_a_date_is_read_as_written(tmp_path, make_cfg, suffix):
    rows = [{"prompt": f"Day {i} of March 2024?", "completion": f"2024-03-{i + 1:02d}"} for i in range(6)]
    path = tmp_path / f"dates.{suffix}"
    path.write_text(json.dumps(rows) if suffix == "json" else "".join(json.dumps(r) + "\n" for r in rows))
    (source,) = finetune.load_sources(make_cfg(dataset_name=str(path), validation_split=0))  # Arrow reads dates
    assert [{k: r[k] for k in ("prompt", "completion")} for r in source.train] == rows
    later = [{**r, "completion": r["completion"].replace("2024", "2025")} for r in rows]
    path.write_text(json.dumps(later) if suffix == "json" else "".join(json.dumps(r) + "\n" for r in later))
    (source,) = finetune.load_sources(make_cfg(dataset_name=str(path), validation_split=0))  # no stale cache
    assert source.train[0]["completion"] == "2025-03-01"


@pytest.mark.parametrize("empty_examples, kept", [("drop", 1), ("keep", 2)])
def test_rows_with_nothing_to_learn_are_counted_named_and_dropped_or_kept(tmp_path, make_cfg, tokenizer, capsys,
                                                                          empty_examples, kept):
    silent = chat(("user", "Hi."), ("assistant", "Hello."))
    silent["messages"][1]["weight"] = 0
    rows = [chat(("user", "Hi."), ("assistant", "Hello.")), chat(("user", "Hi."), ("assistant", " ")), silent]
    cfg = make_cfg(dataset_name=str(write_jsonl(tmp_path / "d.jsonl", rows)), empty_examples=empty_examples)
    examples, _ = tokenized(cfg, tokenizer)
    assert len(examples) == kept  # kept: the empty reply's end-of-turn is trained; a row with no trained token is not
    done = ("dropped (empty_examples: keep keeps them)" if empty_examples == "drop" else
            "kept (empty_examples: keep), but 1 of them have no token with a loss weight (prompt_loss_weight is 0) "
            "and are dropped")
    assert (f"2 examples have nothing to learn: 1 with an empty reply (row 2); 1 with weight 0 on every reply (row 3): "
            f"{done}") in capsys.readouterr().out


@pytest.mark.parametrize("prompt_format", ["raw", "chat"])
def test_alpaca_and_sharegpt_test_rows_prompt_as_their_training_rows(tmp_path, make_cfg, tokenizer, prompt_format):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA_ROW, {**ALPACA_ROW, "input": "", "history": None}])
    cfg = make_cfg(dataset_name=str(path), test_dataset=str(path), prompt_format=prompt_format)
    for pair, example in zip(pairs(cfg, tokenizer), tokenized(cfg, tokenizer)[0]):
        weights = example["loss_weights"]
        last_reply = max(i for i, w in enumerate(weights) if w == 1.0 and weights[i - 1] != 1.0)
        assert (pair.ids, pair.reference) == (example["input_ids"][:last_reply], "5")
    cfg = make_cfg(chat_template="qwen", seq_length=640, test_dataset=str(DATA / "demo_sharegpt_test.parquet"))
    qwen = finetune.load_tokenizer(cfg)
    written_from = cfg.model_copy(update={"test_dataset": str(DATA / "demo_tools_test.jsonl")})
    assert [(p.ids, p.reference, p.calls) for p in pairs(cfg, qwen)] == [
        (p.ids, p.reference, p.calls) for p in pairs(written_from, qwen)]


# ---------------------------------------------------------------------------------------------------------------------
# Test prompts for generation scoring: shown exactly as in training
# ---------------------------------------------------------------------------------------------------------------------

def pairs(cfg, tokenizer, sources=()):
    return finetune.load_test_pairs(cfg, plan_for(cfg, tokenizer), tokenizer, list(sources))


@pytest.mark.parametrize("prompt_format", ["raw", "chat"])
def test_test_prompts_are_the_training_prompts_token_for_token(make_cfg, pc_file, pc_rows, tokenizer, prompt_format):
    cfg = make_cfg(test_dataset=str(pc_file), prompt_format=prompt_format)
    train, _ = tokenized(cfg, tokenizer)
    for pair, example, row in zip(pairs(cfg, tokenizer), train, pc_rows):
        answer_starts = example["loss_weights"].index(1.0)
        assert pair.ids == example["input_ids"][:answer_starts]
        assert (pair.prompt, pair.reference, pair.source) == (row["prompt"], row["completion"], str(pc_file))


def test_conversation_test_rows_prompt_with_the_history_before_the_last_reply(tmp_path, make_cfg, tokenizer):
    conversations = [list(turns) for turns in CONVERSATIONS.values() if turns[-1][0] == "assistant"]
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(*turns) for turns in conversations])
    for pair, turns in zip(pairs(make_cfg(test_dataset=str(path)), tokenizer), conversations):
        history = [{"role": role, "content": content} for role, content in turns[:-1]]
        assert tokenizer.decode(pair.ids) == tokenizer.apply_chat_template(history, tokenize=False,
                                                                           add_generation_prompt=True)
        assert (pair.prompt, pair.reference) == (turns[-2][1], turns[-1][1])


def test_plain_text_rows_have_nothing_to_score(tmp_path, make_cfg, tokenizer):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "just text"}, {"text": "more"}])
    assert pairs(make_cfg(test_dataset=str(path)), tokenizer) == []


def test_validation_rows_of_every_dataset_are_scored_in_turn_up_to_eval_max_examples(two_files, make_cfg, tokenizer):
    first, second = two_files
    cfg = make_cfg(dataset_name=[str(first), str(second)], validation_split=0.25, eval_max_examples=7)
    found = pairs(cfg, tokenizer, finetune.load_sources(cfg))
    assert [p.source for p in found] == [str(first), str(second)] * 3 + [str(first)]


# ---------------------------------------------------------------------------------------------------------------------
# Big datasets: tokens cached by what changes them, several processes, streaming
# ---------------------------------------------------------------------------------------------------------------------

def token_files(cfg, tokenizer) -> dict[str, int]:
    """The cache files of cfg's tokenized training rows: path -> modification time (ns)."""
    files = [f["filename"] for f in load(cfg, tokenizer).train.cache_files]
    return {f: Path(f).stat().st_mtime_ns for f in files}


def test_a_new_output_dir_or_learning_rate_reuses_the_cached_tokens(make_cfg, tmp_path, tokenizer):
    first = token_files(make_cfg(validation_split=0), tokenizer)
    again = token_files(make_cfg(validation_split=0, output_dir=str(tmp_path / "other"), learning_rate=0.1), tokenizer)
    shorter = token_files(make_cfg(validation_split=0, seq_length=64), tokenizer)
    assert first and again == first  # the same files, not written again
    assert not set(shorter) & set(first)


@pytest.mark.parametrize("prompt_format", ["raw", "chat"])
def test_several_processes_tokenize_exactly_as_one(make_cfg, tokenizer, prompt_format):
    one, _ = tokenized(make_cfg(dataset_num_proc=1, prompt_format=prompt_format, prompt_loss_weight=0.1), tokenizer)
    two, _ = tokenized(make_cfg(dataset_num_proc=2, prompt_format=prompt_format, prompt_loss_weight=0.1), tokenizer)
    assert two == one


def test_a_bad_row_in_a_worker_is_the_same_one_line_error(tmp_path, pc_rows, make_cfg, tokenizer):
    rows = [chat(("user", r["prompt"]), ("assistant", r["completion"])) for r in pc_rows[:40]]
    rows[37] = chat(("user", "no reply"))
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(finetune.UserError) as refused:
        tokenized(make_cfg(dataset_name=str(path), dataset_num_proc=2), tokenizer)
    assert str(refused.value) == f"dataset {path}: row 38: no assistant message to learn from"


def test_streaming_without_max_steps_is_refused_before_anything_is_written(tmp_path, tiny_model, pc_file, cli):
    config = write_config(tmp_path / "c.yml", model_name=str(tiny_model), dataset_name=str(pc_file),
                          output_dir=str(tmp_path / "out"), streaming=True)
    done = cli("--config", config)
    assert_one_line_error(done.returncode, done.stdout, done.stderr, r"streaming.*max_steps")
    assert not (tmp_path / "out").exists()


def test_streaming_trains_and_evaluates_on_the_first_rows_held_out(make_cfg, pc_rows, capsys):
    out = finetune.run_training(make_cfg(streaming=True, max_steps=2, validation_split=0.1, eval_max_examples=4,
                                         eval_strategy="steps", eval_steps=1))
    assert "streamed training examples, 2 steps" in capsys.readouterr().out
    assert [row["step"] for row in logged(out) if "eval_loss" in row] == [1, 2]
