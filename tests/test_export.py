"""GGUF export: the file transformers' own GGUF reader loads answers as the merged model does, carries the tokenizer,
stop tokens and (only for chat-trained runs) the chat template, and comes with an Ollama Modelfile; what cannot be
exported is refused in one line, leaving earlier files whole."""

import json
import re
import shutil
import subprocess
import sys

import gguf
import pytest
import torch

import finetune
from conftest import tiny_llama, trained_run
from export_families import FAMILIES, family_tokenizer, tiny_family_model
from helpers import ROOT, assert_one_line_error, run_main, snapshot, write_jsonl


def exported(out, gguf_type: str):
    return finetune.export_run(finetune.open_run(out), gguf_type)


def gguf_answers(path, pairs, stops: list[int], max_new_tokens: int = 8) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return finetune.generate_answers(model, tokenizer, [p.ids for p in pairs], max_new_tokens, stops)[0]


@pytest.fixture(scope="module")
def exports(finished_run, tmp_path_factory):
    """finished_run (a chat-format LoRA run) copied, exported to f16, bf16 and q8_0; with its merged answers."""
    _, original = finished_run
    out = shutil.copytree(original, tmp_path_factory.mktemp("export") / "run")
    run = finetune.open_run(out)
    pairs = run.test_pairs
    reference = finetune.generate_answers(finetune.merged_model(run), run.tokenizer, [p.ids for p in pairs], 8,
                                          run.plan.stop_ids)[0]
    return out, pairs, reference, {t: exported(out, t) for t in ("f16", "bf16", "q8_0")}


@pytest.mark.parametrize("gguf_type", ["f16", "bf16"])
def test_transformers_reads_the_16_bit_file_and_answers_as_the_merged_model(exports, gguf_type):
    out, pairs, reference, files = exports
    assert gguf_answers(files[gguf_type], pairs, finetune.saved_plan(out).stop_ids) == reference


# The largest rounding error of each type, as a fraction of a block's largest weight: q8_0 rounds to the nearest of its
# levels; q4_0 has one level fewer on the positive side, so the far end clamps. The block scale is stored in f16, which
# adds up to 2^-11 of it per level (the 1.15 below). Our part is the same for every 4- and 5-bit type (which tensors,
# in what type, into which file), gguf-py's quantizer the only difference: q8_0 (the converter's) and q4_0 (ours) here;
# q5_1, q5_0 and q4_1 go through llama.cpp itself in bench/export_families.py (every family x every type).
ROUNDING = {"q8_0": 1 / 254, "q4_0": 1 / 8}


@pytest.mark.parametrize("gguf_type", ROUNDING)
def test_each_quantized_file_keeps_the_weights_within_its_rounding(exports, gguf_type):
    from transformers import AutoModelForCausalLM

    out, _, _, files = exports
    path = files.get(gguf_type) or exported(out, gguf_type)
    merged = finetune.merged_model(finetune.open_run(out))
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    for name, weight in merged.state_dict().items():
        if name.endswith("proj.weight"):
            exact = weight.float()
            error = (model.state_dict()[name].float() - exact).abs().max()
            assert error <= exact.abs().max() * ROUNDING[gguf_type] * 1.15, name


def metadata(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def test_the_file_carries_what_a_runtime_needs(exports, tiny_model):
    out, _, _, files = exports
    meta, config = metadata(files["q8_0"]), json.loads((tiny_model / "config.json").read_text())
    assert meta["general.name"] == "run-q8_0" and "LoRA fine-tune of" in meta["general.description"]
    assert not any(".source" in str(value) for value in meta.values())  # nothing named after the staging folder
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.attention.head_count"],
            meta["llama.attention.head_count_kv"]) == (2, 64, 4, 2)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.eot_token_id"]) == (config["bos_token_id"], 2, 2)
    assert len(meta["tokenizer.ggml.tokens"]) == config["vocab_size"] and meta["tokenizer.ggml.merges"]
    assert meta["tokenizer.chat_template"] == (out / "chat_template.jinja").read_text()
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(files["q8_0"]).tensors}  # tied embeddings


def test_the_modelfile_prompts_and_stops_as_training_did(exports, raw_run):
    out, _, _, files = exports
    chat = files["q8_0"].with_suffix(".Modelfile").read_text()
    assert chat.startswith("# q8_0: the type of run-q8_0.gguf, exported by finetune.py\nFROM ./run-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in chat
    assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n" in chat
    raw = exported(raw_run[1], "q8_0")
    assert 'TEMPLATE """{{ .Prompt }}"""' in raw.with_suffix(".Modelfile").read_text()
    assert "tokenizer.chat_template" not in metadata(raw)  # a raw-prompt run gets no template to wrap prompts in


def test_untied_embeddings_and_rope_scaling_come_through(tmp_path, embedded_model, pc_rows):
    model = tiny_llama(tmp_path / "untied", embedded_model, tie_word_embeddings=False, head_dim=32,
                       rope_scaling={"rope_type": "linear", "factor": 2.0})
    _, out = trained_run(tmp_path, model, write_jsonl(tmp_path / "d.jsonl", pc_rows), use_peft=False, max_steps=2)
    path = exported(out, "f16")
    meta = metadata(path)
    assert "output.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    assert (meta["llama.attention.key_length"], meta["llama.rope.scaling.type"], meta["llama.rope.scaling.factor"]) \
        == (32, "linear", 2.0)


@pytest.fixture(scope="module")
def odd_rows_run(tmp_path_factory, embedded_model, pc_rows):
    folder = tmp_path_factory.mktemp("odd")
    model = tiny_llama(folder / "odd", embedded_model, intermediate_size=80)  # ffn_down rows of 80: not 32s
    return trained_run(folder, model, write_jsonl(folder / "d.jsonl", pc_rows), max_steps=1)[1]


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_matrices_whose_rows_do_not_fit_the_blocks_are_kept_in_f16_as_llama_cpp_does(odd_rows_run, gguf_type):
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(exported(odd_rows_run, gguf_type)).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == gguf_type.upper()


# Two families with converter paths of their own: Mistral (a sentencepiece-style tokenizer, for which export writes a
# tokenizer.model) and Phi-3 (its own architecture, untied head). Qwen 2 and 3, Llama 3 (its rope scaling) and Gemma 3
# go through the same steps in bench/export_families.py, read back by llama.cpp itself: their tiny models'
# 128k-262k vocabularies take a minute or two each through transformers' GGUF reader. The real Gemma 3 270M (a 262k
# vocabulary) exports in test_gemma.py, the real SmolLM2 in test_end_to_end.py.
TESTED_FAMILIES = ["mistral", "phi3"]


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory, test_models) -> dict:
    """The real tokenizers of the families (llama.cpp's vocabulary-only GGUF files), as folders."""
    return {name: family_tokenizer(name, tmp_path_factory.mktemp(name))
            for name in {FAMILIES[family][2] for family in TESTED_FAMILIES}}


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_each_family_trains_merges_exports_and_reads_back_as_the_merged_model(family, tmp_path,
                                                                             family_tokenizers, pc_rows):
    from transformers import AutoModelForCausalLM

    model = tiny_family_model(tmp_path / family, family, family_tokenizers[FAMILIES[family][2]])
    _, out = trained_run(tmp_path, model, write_jsonl(tmp_path / "d.jsonl", pc_rows[:8]), max_steps=2,
                         merge_adapter=True, eval_strategy="no", validation_split=0, test_dataset=None)
    run = finetune.open_run(out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    ids = run.tokenizer("Request: a table for two at 7pm\nJSON:", return_tensors="pt").input_ids
    path = finetune.export_run(run, "f16")  # the 4- and 5-bit path is the same for every family: tested above
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == FAMILIES[family][3]
    read_back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        expected, got = merged(ids).logits, read_back(ids).logits
    assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()


EXPORT_UNDER_A_SIZE_LIMIT = """\
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))
sys.path.insert(0, {root!r})
import finetune
sys.exit(finetune.main(["export", "--model", sys.argv[1], "--type", "f16"]))
"""


def test_a_full_disk_while_writing_is_one_line_and_leaves_earlier_files_whole(exports, tmp_path):
    out, _, _, _ = exports
    before = snapshot(out / "gguf")
    done = subprocess.run([sys.executable, "-c", EXPORT_UNDER_A_SIZE_LIMIT.format(root=str(ROOT)), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(done.returncode, done.stdout, done.stderr,
                          r"export: cannot write .*gguf \(the disk is full\)")
    assert snapshot(out / "gguf") == before


# Every export scored in llama.cpp itself, on the run's test rows, with the file's own template and stop tokens.

def test_every_export_is_scored_in_llama_cpp_beside_the_trained_model(exports):
    out, pairs, _, files = exports
    summary = json.loads((out / "eval.json").read_text())
    assert {path.name for path in files.values()} <= set(summary["exported"])
    f16 = summary["exported"]["run-f16.gguf"]
    assert f16["type"] == "f16" and f16["scores"]["examples"] == len(pairs) == 3
    # llama.cpp reads the f16 file with its own template and tokenizer, and answers as the trained model did
    assert f16["same_answers"] == 3 and f16["differ"] == [] and f16["not_stopped"] == 0
    assert f16["scores"]["exact_match"] == summary["fine_tuned"]["exact_match"]


def test_eval_of_a_gguf_file_scores_it_in_llama_cpp(exports, capfd):
    out, _, _, files = exports
    code, stdout, err = run_main(capfd, "eval", "--model", str(files["bf16"]))
    assert code == 0, err
    assert ["metric", "base", "fine-tuned", "llama.cpp", "bf16"] in [line.split() for line in stdout.splitlines()]
    assert json.loads((out / "eval.json").read_text())["exported"]["run-bf16.gguf"]["type"] == "bf16"


# Each K-quant on tiny models of hidden size 256 (a K-quant block), of two families, quantized by llama.cpp's
# quantizer and run by llama.cpp: Phi-3 (its own architecture and tokenizer), every row a whole number of blocks, and
# Llama (SmolLM2's tokenizer) with an MLP of 320, whose ffn_down rows fall back to another type.
K_FAMILIES = ["llama", "phi3"]
K_TYPE = finetune.LLAMA_QUANT_TYPES


@pytest.fixture(scope="module")
def wide_f32_files(tmp_path_factory, embedded_model, test_models) -> dict:
    """Per family, a tiny model of hidden size 256 converted to an f32 GGUF by llama.cpp's converter."""
    files = {}
    for family in K_FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        model = (tiny_llama(folder / "model", embedded_model, hidden_size=256, intermediate_size=320)
                 if family == "llama" else
                 tiny_family_model(folder / "model", family, family_tokenizer("phi-3", folder / "tokenizer"),
                                   hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                   num_key_value_heads=4))
        if family == "phi3":  # what export's staging writes for a sentencepiece-style vocabulary
            spec = json.loads((model / "tokenizer.json").read_text())
            (model / "tokenizer.model").write_bytes(finetune.sentencepiece_model(spec))
        finetune.convert_to_gguf(model, folder / "f32.gguf", "f32")
        files[family] = folder / "f32.gguf"
    return files


@pytest.mark.parametrize("family", K_FAMILIES)
def test_each_k_quant_is_written_by_llama_cpp_and_runs_in_it(wide_f32_files, family, tmp_path):
    source, prompt = wide_f32_files[family], finetune.TestPair("hi", [1] * 4, "", "x", request={"text": "Hello"})
    sizes = {}
    for gguf_type in K_TYPE:
        path = tmp_path / f"{gguf_type}.gguf"
        note = finetune.llama_quantized(source, path, gguf_type, None)
        fallback = "; 2 of 20 tensors have rows of 320 values, which do not divide into its 256-value blocks: " \
                   "llama.cpp's quantizer wrote them as .* instead"
        assert re.fullmatch(rf"{gguf_type}: [\d.]+ bits per weight{fallback if family == 'llama' else ''}", note), note
        read_type, (answer,) = finetune.llama_cpp_answers(path, [prompt], max_new_tokens=4)
        assert read_type == gguf_type and (answer["stopped"] or answer["answer"])
        sizes[gguf_type] = path.stat().st_size
    assert sizes["q2_k"] < sizes["q3_k_m"] < sizes["q4_k_s"] < sizes["q4_k_m"] < sizes["q5_k_s"] < sizes["q5_k_m"] \
        < sizes["q6_k"] < source.stat().st_size / 4
    if family == "llama":  # the tensor types of one of them (each read of the file's 49k tokens takes 2 s)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q4_k_m.gguf").tensors}
        assert types["blk.0.ffn_up.weight"] == "Q4_K"


QUANTIZE_UNDER_A_SIZE_LIMIT = """\
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
sys.path.insert(0, {root!r})
import finetune
finetune.llama_quantized(finetune.Path(sys.argv[1]), finetune.Path(sys.argv[2]), "q4_k_m", None)
"""


def test_a_full_disk_while_quantizing_is_a_disk_full_error_and_leaves_no_partial_file(wide_f32_files, tmp_path):
    done = subprocess.run([sys.executable, "-c", QUANTIZE_UNDER_A_SIZE_LIMIT.format(root=str(ROOT)),
                           str(wide_f32_files["llama"]), str(tmp_path / "out.gguf")], capture_output=True, text=True)
    assert done.returncode and done.stderr.splitlines()[-1] == "OSError: [Errno 27] File too large", done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # export turns this error into its one line (the f16 case above)


def test_a_gguf_base_trains_merges_and_exports_a_k_quant_with_an_importance_matrix(wide_f32_files, tmp_path,
                                                                                    pc_rows):
    _, out = trained_run(tmp_path, wide_f32_files["llama"], write_jsonl(tmp_path / "d.jsonl", pc_rows[:8]), max_steps=2,
                         merge_adapter=True, export_gguf="q3_k_m", eval_strategy="no", validation_split=0)
    assert finetune.saved_plan(out).architecture == "LlamaForCausalLM"
    assert (out / "merged" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "gguf").iterdir()) == ["run-q3_k_m.Modelfile", "run-q3_k_m.gguf"]
    fields = gguf.GGUFReader(out / "gguf" / "run-q3_k_m.gguf").fields
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q3_K_M
    assert fields["quantize.imatrix.chunks_count"].contents() >= 1  # q3_k_m: an importance matrix by default
    exported = json.loads((out / "eval.json").read_text())["exported"]["run-q3_k_m.gguf"]
    assert exported["type"] == "q3_k_m" and exported["scores"]["examples"] == 3 and exported["imatrix"] is True
    imatrix, quantized = exported["notes"]
    assert re.fullmatch(r"importance matrix: computed by llama.cpp over \d+ tokens of training rows \(\d+-token "
                        r"chunks\)", imatrix)
    assert re.fullmatch(r"q3_k_m: [\d.]+ bits per weight; 2 of \d+ tensors have rows of 320 values, which do not "
                        r"divide into its 256-value blocks: llama.cpp's quantizer wrote them as q\d_\d instead",
                        quantized)
