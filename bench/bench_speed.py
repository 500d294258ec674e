"""Training speed of finetune.py against plain TRL run the way a user of this CPU would run it.

    .venv/bin/python bench/bench_speed.py [--steps 12] [--rounds 2] [--batch-size 8] [--max-length 256] [--json OUT]

Three trainers, run alternately `--rounds` times each, every run in a fresh child process (clean peak memory, and each
side gets its own allocator environment):
- trl-bf16: TRL's SFTTrainer with its defaults (bf16=True autocast, gradient checkpointing, padding, completion-only
  loss, entropy/accuracy metrics) and fp32 weights. Only where the CPU has bf16 units (AVX512-BF16 or AMX): elsewhere
  bf16 is emulated and hopeless (the bf16 matmul peak printed below says by how much), so it is skipped.
- trl-fp32: the same with bf16=False, what a user of a CPU without bf16 units runs.
- ours: finetune.py with its defaults, in the environment finetune.py gives a training run (its GLIBC_TUNABLES).
The baseline is the faster TRL setting. All train LoRA r=16, alpha=32 on all linear layers of the embedded
SmolLM2-135M-Instruct, on ~400 synthetic prompt/completion rows of random words (fixed seed).

Per run: non-padding tokens trained per second over the wall time of trainer.train(); peak memory of the child (RSS on
CPU, max allocated on CUDA); time from train() to the end of the first optimizer step; the last logged training loss;
and an eval loss defined the same way for every trainer: mean completion-token cross-entropy on 32 held-out rows,
plain fp32 forward. The matmul peak of each precision is measured on the benchmark's own shapes (the model's linear
layers at one batch's token count), best of several runs; MFU = tok/s * 4 * parameters / the peak of the precision
that side computes in (LoRA costs ~4 x params FLOPs per token). Medians over rounds, and ours / baseline ratios: only
same-run ratios compare across machines. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402  (the repository root is not on the path when this file is run as a script)

MODEL_DIR = str(ROOT / finetune.EMBEDDED_MODEL)
LORA_R, LORA_ALPHA, LEARNING_RATE = 16, 32, 2e-4
WORDS = ("the model learns to answer questions about data and code with short precise sentences "
         "while a careful reader checks every result twice before it ships").split()
RESULT_PREFIX = "BENCH_RESULT "
CPU_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each trainer, alternating")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (longer ones are cut)")
    parser.add_argument("--json", metavar="OUT.json", help="write every run's numbers and the medians here")
    parser.add_argument("--child", choices=["trl-bf16", "trl-fp32", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Data and the shared eval loss
# ---------------------------------------------------------------------------------------------------------------------

def write_dataset(folder: Path, train_rows: int = 400, eval_rows: int = 32, seed: int = 0) -> None:
    """train.jsonl and eval.jsonl of random-word prompt/completion rows; the prompt ends in a newline so that prompt and
    completion tokenize the same whether they are tokenized apart (finetune.py) or joined (TRL)."""
    rng = random.Random(seed)
    for name, count in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows)):
        with (folder / name).open("w") as f:
            for _ in range(count):
                prompt = " ".join(rng.choices(WORDS, k=rng.randint(10, 120))) + "\n"
                completion = " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))
                f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def completion_eval_loss(model, tokenizer, rows: list[dict], max_length: int) -> float:
    """Mean cross-entropy over all completion tokens (completion + EOS; prompt masked) of `rows`, one row per forward so
    that no padding or mask enters, in fp32 without autocast: the same definition for every trainer."""
    import torch
    import torch.nn.functional as F

    model = model.float().eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in rows:
            prompt = tokenizer(row["prompt"])["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor(prompt + completion, device=device)[:max_length]
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
            if logits.dtype != torch.float32:
                raise RuntimeError(f"eval forward ran in {logits.dtype}: an autocast wrapper is still on the model")
            scored = torch.arange(len(ids) - 1, device=device) >= len(prompt) - 1  # targets that are completion tokens
            total += F.cross_entropy(logits[scored], ids[1:][scored], reduction="sum").item()
            count += int(scored.sum())
    return total / count


# ---------------------------------------------------------------------------------------------------------------------
# Child: build one trainer, train it, measure, print one JSON line
# ---------------------------------------------------------------------------------------------------------------------

def first_step_timer():
    """A callback that records when the first optimizer step ends; `start` is set just before train()."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        start = end = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.end is None:
                self.end = time.perf_counter()

    return FirstStep()


def trl_trainer(data: Path, out: Path, args: argparse.Namespace, bf16: bool, use_cpu: bool):
    """Plain TRL; returns (trainer, tokens trained so far). Tokens are counted in the collator, in the order the batches
    are made; the data loader fetches a batch ahead, so only the first `global_step` batches were trained on."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    # The model folder stores bf16; transformers 5 would load it as such, so ask for the fp32 weights TRL users train.
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    config = SFTConfig(output_dir=str(out), max_length=args.max_length, per_device_train_batch_size=args.batch_size,
                       max_steps=args.steps, bf16=bf16, learning_rate=LEARNING_RATE, save_strategy="no",
                       logging_steps=log_every(args.steps), report_to="none", use_cpu=use_cpu)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    rows = datasets.load_dataset("json", data_files=str(data / "train.jsonl"), split="train")
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, peft_config=lora,
                         processing_class=AutoTokenizer.from_pretrained(MODEL_DIR))
    counts: list[int] = []
    collator = trainer.data_collator

    def collate_and_count(examples):
        batch = collator(examples)
        counts.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = collate_and_count
    return trainer, lambda: sum(counts[:trainer.state.global_step])


def our_trainer(data: Path, out: Path, args: argparse.Namespace):
    """finetune.py with its defaults; returns (trainer, tokens trained so far, the precision it planned)."""
    overrides = [f"model_name={MODEL_DIR}", f"dataset_name={data / 'train.jsonl'}", "validation_split=0",
                 "eval_strategy=no", "save_strategy=no", "eval_before=false", f"max_steps={args.steps}",
                 f"batch_size={args.batch_size}", f"seq_length={args.max_length}", f"peft_lora_r={LORA_R}",
                 f"peft_lora_alpha={LORA_ALPHA}", f"learning_rate={LEARNING_RATE}", f"output_dir={out}",
                 f"logging_steps={log_every(args.steps)}", "prompt_format=raw"]  # TRL's rows are raw prompts too
    cfg = finetune.load_config(None, overrides)
    lock = finetune.prepared_run(cfg)
    run = lock.__enter__()  # held until the child exits
    trainer = finetune.make_trainer(cfg, run, finetune.build_model(cfg, run.plan))
    return trainer, lambda: trainer.trained_tokens, run.plan.precision


def log_every(steps: int) -> int:
    """About four log lines per run: each logged loss is the mean since the previous log, less noisy than one batch."""
    return max(1, steps // 4)


def run_child(args: argparse.Namespace) -> None:
    if args.child == "ours":
        finetune.maybe_reexec_with_fast_allocator()  # re-executes this child once, exactly as a finetune.py run does
    import resource

    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    data = Path(args.data)
    out = Path(tempfile.mkdtemp(prefix=f"{args.child}-", dir=data))
    if args.child == "ours":
        trainer, trained_tokens, precision = our_trainer(data, out, args)
    else:
        precision = args.child.removeprefix("trl-")
        trainer, trained_tokens = trl_trainer(data, out, args, bf16=precision == "bf16", use_cpu=not cuda)
    timer = first_step_timer()
    trainer.add_callback(timer)

    timer.start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - timer.start
    # Peak memory of training, read before the eval below casts the model to fp32.
    peak_mib = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # Drop accelerate's autocast wrapper from model.forward so the eval really runs in fp32.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    eval_rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()]
    tokens = trained_tokens()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    result = {"kind": args.child, "precision": precision, "steps": trainer.state.global_step, "tokens": tokens,
              "train_s": seconds, "tok_s": tokens / seconds, "peak_mib": peak_mib,
              "memory": "cuda_max_allocated" if cuda else "rss", "first_step_s": timer.end - timer.start,
              "train_loss": losses[-1] if losses else None,
              "eval_loss": completion_eval_loss(model, tokenizer, eval_rows, args.max_length),
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Parent: the machine, its matmul peaks, alternating children, the summary
# ---------------------------------------------------------------------------------------------------------------------

def cpu_kind() -> dict:
    flags = finetune.cpu_flags()
    try:
        name = next(line.split(":", 1)[1].strip() for line in finetune.CPUINFO.read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    kind = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else (
        "AVX512 (no bf16)" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "other")
    return {"kind": kind, "model": name, "cores": os.cpu_count(), "flags": {f: f in flags for f in CPU_FLAGS}}


def benchmark_shapes(tokens: int) -> list[tuple[int, int, int]]:
    """(rows, inner, outer) of the model's linear layers at one batch's token count."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(MODEL_DIR)
    kv = c.num_key_value_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    return [(tokens, c.hidden_size, c.hidden_size), (tokens, c.hidden_size, kv),
            (tokens, c.hidden_size, c.intermediate_size), (tokens, c.intermediate_size, c.hidden_size)]


def matmul_peak(dtype_name: str, shapes, best_of: int = 10, budget_s: float = 20.0) -> dict:
    """Best and median FLOP/s of `x @ W.T` over the shapes, on the CPU (or the GPU). A precision the hardware only
    emulates is measured once per shape and stops early: it is orders of magnitude off."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    best, samples, started = 0.0, [], time.perf_counter()
    for rows, inner, outer in shapes:
        x = torch.randn(rows, inner, dtype=dtype, device=device)
        w = torch.randn(outer, inner, dtype=dtype, device=device)
        for repeat in range(best_of + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            x @ w.T
            if device == "cuda":
                torch.cuda.synchronize()
            rate = 2 * rows * inner * outer / (time.perf_counter() - start)
            if repeat:  # the first run warms up
                samples.append(rate)
                best = max(best, rate)
            if time.perf_counter() - started > budget_s:
                return {"best": best or rate, "median": statistics.median(samples or [rate])}
    return {"best": best, "median": statistics.median(samples)}


def model_parameters() -> int:
    """Parameters of the base model (tied embeddings counted once), from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_DIR))
    return sum(p.numel() for p in model.parameters())


def child_env() -> dict[str, str]:
    """The plain environment: no allocator setting inherited, nothing that stops finetune.py from applying its own."""
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    env.pop("FINETUNE_NO_REEXEC", None)
    return env


def run_one(kind: str, data: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--data", str(data),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        sys.exit(f"{kind} run failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def summarize(runs: list[dict], peaks: dict, params: int) -> tuple[dict, str, dict]:
    """(per-trainer medians with MFU against its own precision's peak, the baseline's name, ratios ours / baseline)."""
    medians = {}
    for kind in dict.fromkeys(r["kind"] for r in runs):
        mine = [r for r in runs if r["kind"] == kind]
        med = {key: statistics.median(r[key] for r in mine)
               for key in ("tok_s", "peak_mib", "first_step_s", "train_loss", "eval_loss")}
        med["precision"] = mine[0]["precision"]
        med["mfu"] = med["tok_s"] * 4 * params / peaks[med["precision"]]["best"]
        medians[kind] = med
    baseline = max((k for k in medians if k != "ours"), key=lambda k: medians[k]["tok_s"])
    ratios = {key: medians["ours"][key] / medians[baseline][key]
              for key in ("tok_s", "peak_mib", "first_step_s", "eval_loss")}
    return medians, baseline, ratios


def print_table(medians: dict, baseline: str, ratios: dict) -> None:
    kinds = list(medians)
    rows = [("tok/s", "tok_s", "{:.1f}"), ("peak memory (MiB)", "peak_mib", "{:.0f}"),
            ("time to first step (s)", "first_step_s", "{:.2f}"), ("final train loss", "train_loss", "{:.4f}"),
            ("eval loss", "eval_loss", "{:.4f}"), ("MFU", "mfu", "{:.1%}"), ("precision", "precision", "{}")]
    print(f"{'median':<24}" + "".join(f"{k:>12}" for k in kinds) + f"{'ours/' + baseline:>16}")
    for label, key, fmt in rows:
        ratio = f"{ratios[key]:.3f}" if key in ratios else ""
        print(f"{label:<24}" + "".join(f"{fmt.format(medians[k][key]):>12}" for k in kinds) + f"{ratio:>16}")


def main() -> None:
    args = parse_args()
    if args.child:
        run_child(args)
        return
    print("command:", shlex.join(sys.orig_argv), flush=True)
    cpu = cpu_kind()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores, kind {cpu['kind']} "
          f"({', '.join(f'{f}={v}' for f, v in cpu['flags'].items())})", flush=True)
    shapes, params = benchmark_shapes(tokens=args.batch_size * 100), model_parameters()
    peaks = {p: matmul_peak({"fp32": "float32", "bf16": "bfloat16"}[p], shapes) for p in ("fp32", "bf16")}
    for precision, peak in peaks.items():
        print(f"{precision} matmul on the benchmark's shapes: best {peak['best'] / 1e12:.3f} TFLOP/s, median "
              f"{peak['median'] / 1e12:.3f}", flush=True)
    kinds = ["trl-fp32", "ours"]
    if finetune.cpu_has_bf16() or finetune.cuda_available():
        kinds.insert(0, "trl-bf16")
    else:
        print(f"trl-bf16 skipped: this CPU has no bf16 units, so bf16 matmuls are emulated at "
              f"{peaks['bf16']['best'] / peaks['fp32']['best']:.1%} of fp32's speed", flush=True)
    print(f"model {params / 1e6:.1f}M parameters; {args.steps} steps x batch {args.batch_size}, "
          f"max length {args.max_length}, {args.rounds} round(s)", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_speed-") as tmp:
        write_dataset(Path(tmp))
        for round_ in range(1, args.rounds + 1):
            for kind in kinds:  # alternating, so that drift in machine load hits every trainer alike
                started = time.perf_counter()
                run = run_one(kind, Path(tmp), args) | {"round": round_}
                runs.append(run)
                print(f"round {round_} {kind:<9} {run['tok_s']:8.1f} tok/s  peak {run['peak_mib']:6.0f} MiB  "
                      f"eval loss {run['eval_loss']:.4f}  ({time.perf_counter() - started:.0f} s in all; "
                      f"GLIBC_TUNABLES={run['glibc_tunables']})", flush=True)
    medians, baseline, ratios = summarize(runs, peaks, params)
    print_table(medians, baseline, ratios)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.orig_argv, "cpu": cpu, "peaks": peaks,
                                               "parameters": params, "settings": vars(args), "runs": runs,
                                               "medians": medians, "baseline": baseline, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
