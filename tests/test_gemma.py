"""The second real model, Gemma 3 270M base (262k vocabulary, no chat template of its own), through every command in
one short run: a chat-format LoRA run with chat_template: gemma, scored before and after, then eval, generate
--compare, merge and export on it. (A raw-prompt full fine-tune's export, template-free, is tested on the tiny models
in test_export.py.) That Gemma learns is measured at length in the README (bench/check_scores.py and
bench/export_check.py); here each step has to work on it."""

import json

import pytest
import yaml

import finetune
from helpers import ROOT, run_main, write_jsonl

pytestmark = pytest.mark.slow

CHAT_TRAIN = ROOT / "data" / "demo_chat_train.jsonl"
CHAT_TEST = ROOT / "data" / "demo_chat_test.jsonl"
GEMMA_FAST = dict(max_steps=2, batch_size=2, seq_length=128, logging_steps=1, eval_strategy="no", save_strategy="no",
                  validation_split=0, eval_before=True, eval_max_new_tokens=8, precision="fp32", learning_rate=1e-3)


def first_rows(path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def gemma_run(folder, model, train, test, **settings):
    """A short run of Gemma on the first rows of a demo file, scoring three test rows before and after."""
    data = write_jsonl(folder / "train.jsonl", first_rows(train, 8))
    tests = write_jsonl(folder / "test.jsonl", first_rows(test, 3))
    cfg = finetune.Config(**{**GEMMA_FAST, **settings}, model_name=str(model), dataset_name=str(data),
                          test_dataset=str(tests), output_dir=str(folder / "run"))
    return finetune.run_training(cfg)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, gemma_model):
    return gemma_run(tmp_path_factory.mktemp("gemma-chat"), gemma_model, CHAT_TRAIN, CHAT_TEST, chat_template="gemma")


def test_a_chat_run_saves_the_gemma_template_and_stops_at_end_of_turn(chat_run):
    from transformers import AutoTokenizer

    summary = json.loads((chat_run / "eval.json").read_text())
    assert finetune.saved_plan(chat_run).prompt_format == "chat"
    assert summary["base"]["examples"] == summary["fine_tuned"]["examples"] == 3
    assert yaml.safe_load((chat_run / "config.yml").read_text())["chat_template"] == "gemma"
    tokenizer = AutoTokenizer.from_pretrained(chat_run)
    assert tokenizer.chat_template == (ROOT / "templates" / "gemma.jinja").read_text()
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert json.loads((chat_run / "generation_config.json").read_text())["eos_token_id"] == [
        tokenizer.eos_token_id, end_of_turn]
    assert "chat template: gemma" in (chat_run / "README.md").read_text()


def test_eval_and_generate_compare_on_the_chat_run(chat_run, capfd):
    before = json.loads((chat_run / "eval.json").read_text())
    code, _, err = run_main(capfd, "eval", "--model", str(chat_run))
    assert code == 0, err
    assert json.loads((chat_run / "eval.json").read_text())["fine_tuned"] == before["fine_tuned"]
    code, stdout, err = run_main(capfd, "generate", "--model", str(chat_run), "--prompt", "Hi", "--compare")
    assert code == 0, err
    assert stdout.count("--- base") == 1 and stdout.count("--- fine-tuned") == 1


def test_merge_and_export_the_chat_run_with_its_template(chat_run, capfd):
    import gguf

    code, _, err = run_main(capfd, "merge", "--model", str(chat_run))
    assert code == 0, err
    assert (chat_run / "merged" / "chat_template.jinja").read_text() == (ROOT / "templates" / "gemma.jinja").read_text()
    code, _, err = run_main(capfd, "export", "--model", str(chat_run), "--type", "q8_0")
    assert code == 0, err
    fields = gguf.GGUFReader(chat_run / "gguf" / "run-q8_0.gguf").fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["tokenizer.chat_template"].contents() == (ROOT / "templates" / "gemma.jinja").read_text()
    # scored in llama.cpp with that template and Gemma's end of turn: every answer stops as the trained model's does
    exported = json.loads((chat_run / "eval.json").read_text())["exported"]["run-q8_0.gguf"]
    assert exported["scores"]["examples"] == 3 and exported["not_stopped"] == 0
