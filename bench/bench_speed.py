"""Training speed of finetune.py against plain TRL, on the same model, data and LoRA shape.

    .venv/bin/python bench/bench_speed.py [--steps 12] [--rounds 2] [--batch-size 8] [--max-length 256] [--json OUT.json]

Two trainers, run alternately `--rounds` times each, every run in a fresh child process (clean peak memory, and each
side gets its own allocator environment):
- baseline: TRL's SFTTrainer as its users run it (fp32 weights, bf16=True autocast, TRL's defaults: gradient
  checkpointing, padding, completion-only loss, entropy/accuracy metrics), plain environment;
- ours: finetune.prepare_trainer with finetune.py's defaults, in the environment finetune.py gives a training run
  (GLIBC_TUNABLES from finetune.maybe_reexec_with_fast_allocator).
Both train LoRA r=16, alpha=32 on all linear layers of the embedded SmolLM2-135M-Instruct, on ~400 synthetic
prompt/completion rows of random words (fixed seed).

Per run: non-padding tokens trained per second over the wall time of trainer.train(); peak memory of the child (RSS on
CPU, max allocated on CUDA); time from train() to the end of the first optimizer step; the last logged training loss;
and an eval loss defined the same way for both: mean completion-token cross-entropy on 32 held-out rows, plain fp32
forward. MFU = tok/s * 4 * parameters / the bf16 matmul peak measured here (LoRA costs ~4 x params FLOPs per token).
The table shows medians over rounds and the ratios ours / baseline; only same-run ratios are comparable across
machines. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each trainer, alternating")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (longer ones are cut)")
    parser.add_argument("--json", metavar="OUT.json", help="write every run's numbers and the medians here")
    parser.add_argument("--child", choices=["baseline", "ours"], help=argparse.SUPPRESS)
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
    that no padding or mask enters, in fp32 without autocast: the same definition for both trainers."""
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


def baseline_trainer(data: Path, out: Path, args: argparse.Namespace, use_cpu: bool):
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
                       max_steps=args.steps, bf16=True, learning_rate=LEARNING_RATE, logging_steps=log_every(args.steps),
                       save_strategy="no", report_to="none", use_cpu=use_cpu)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    rows = datasets.load_dataset("json", data_files=str(data / "train.jsonl"), split="train")
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=AutoTokenizer.from_pretrained(MODEL_DIR),
                         peft_config=lora)
    counts: list[int] = []
    collator = trainer.data_collator

    def collate_and_count(examples):
        batch = collator(examples)
        counts.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = collate_and_count
    return trainer, lambda: sum(counts[:trainer.state.global_step])


def ours_trainer(data: Path, out: Path, args: argparse.Namespace):
    """finetune.py with its defaults; returns (trainer, tokens trained so far)."""
    overrides = [f"model_name={MODEL_DIR}", f"dataset_name={data / 'train.jsonl'}", "validation_split=0",
                 "eval_strategy=no", "save_strategy=no", "eval_before=false", "test_dataset=null",
                 f"max_steps={args.steps}", f"batch_size={args.batch_size}", f"seq_length={args.max_length}",
                 f"peft_lora_r={LORA_R}", f"peft_lora_alpha={LORA_ALPHA}", f"learning_rate={LEARNING_RATE}",
                 f"logging_steps={log_every(args.steps)}", f"output_dir={out}"]
    run = finetune.prepare_trainer(finetune.load_config(None, overrides))
    return run.trainer, lambda: run.trainer.trained_tokens  # the closure keeps `run`, and so its output_dir lock, alive


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
    trainer, trained_tokens = (baseline_trainer(data, out, args, use_cpu=not cuda) if args.child == "baseline"
                               else ours_trainer(data, out, args))
    timer = first_step_timer()
    trainer.add_callback(timer)

    timer.start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - timer.start
    # Peak memory of training, read before the eval below casts the model to fp32.
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # Drop accelerate's autocast wrapper from model.forward so the eval really runs in fp32.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    eval_rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()]
    tokens = trained_tokens()
    result = {"kind": args.child, "steps": trainer.state.global_step, "tokens": tokens, "train_s": seconds,
              "tok_s": tokens / seconds, "peak_mib": peak_mib, "memory": "cuda_max_allocated" if cuda else "rss",
              "first_step_s": timer.end - timer.start, "train_loss": losses[-1] if losses else None,
              "eval_loss": completion_eval_loss(model, AutoTokenizer.from_pretrained(MODEL_DIR), eval_rows, args.max_length),
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Parent: machine peak, alternate children, summarize
# ---------------------------------------------------------------------------------------------------------------------

def matmul_peak_flops(best_of: int = 10) -> float:
    """Best bf16 matmul throughput here, in FLOP/s (2048^2 on CPU; larger on GPU, where 2048 is too small to fill it)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    best = float("inf")
    for _ in range(best_of + 1):  # the first run warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def model_parameters() -> int:
    """Parameters of the base model (tied embeddings counted once), from its config on the meta device: no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_DIR))
    return sum(p.numel() for p in model.parameters())


def child_env() -> dict[str, str]:
    """The plain environment: no allocator setting inherited, and nothing that stops finetune.py from applying its own."""
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


RATIOS = ("tok_s", "peak_mib", "first_step_s", "eval_loss")


def summarize(runs: list[dict], peak_flops: float, params: int) -> tuple[dict, dict]:
    """(per-trainer medians over rounds with MFU, ratios ours / baseline of the medians)."""
    medians = {}
    for kind in ("baseline", "ours"):
        mine = [r for r in runs if r["kind"] == kind]
        med = {key: statistics.median(r[key] for r in mine)
               for key in ("tok_s", "peak_mib", "first_step_s", "train_loss", "eval_loss")}
        med["mfu"] = med["tok_s"] * 4 * params / peak_flops
        medians[kind] = med
    return medians, {key: medians["ours"][key] / medians["baseline"][key] for key in RATIOS}


def print_table(medians: dict, ratios: dict) -> None:
    rows = [("tok/s", "tok_s", "{:.1f}"), ("peak memory (MiB)", "peak_mib", "{:.0f}"),
            ("time to first step (s)", "first_step_s", "{:.2f}"), ("final train loss", "train_loss", "{:.4f}"),
            ("eval loss", "eval_loss", "{:.4f}"), ("MFU", "mfu", "{:.2%}")]
    print(f"{'median':<24}{'baseline':>12}{'ours':>12}{'ours/baseline':>16}")
    for label, key, fmt in rows:
        ratio = f"{ratios[key]:.3f}" if key in ratios else ""
        print(f"{label:<24}{fmt.format(medians['baseline'][key]):>12}{fmt.format(medians['ours'][key]):>12}{ratio:>16}")


def main() -> None:
    args = parse_args()
    if args.child:
        run_child(args)
        return
    print("command:", shlex.join(sys.orig_argv), flush=True)
    peak_before, params = matmul_peak_flops(), model_parameters()
    print(f"model {params / 1e6:.1f}M parameters; {args.steps} steps x batch {args.batch_size}, "
          f"max length {args.max_length}, {args.rounds} round(s)", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_speed-") as tmp:
        write_dataset(Path(tmp))
        for round_ in range(1, args.rounds + 1):
            for kind in ("baseline", "ours"):  # alternating, so that drift in machine load hits both alike
                started = time.perf_counter()
                run = run_one(kind, Path(tmp), args) | {"round": round_}
                runs.append(run)
                print(f"round {round_} {kind:<8} {run['tok_s']:8.1f} tok/s  peak {run['peak_mib']:6.0f} MiB  "
                      f"eval loss {run['eval_loss']:.4f}  ({time.perf_counter() - started:.0f} s in all; "
                      f"GLIBC_TUNABLES={run['glibc_tunables']})", flush=True)
    # The peak is taken again after the runs and the best kept: a reading under a passing load would inflate MFU.
    peak_after = matmul_peak_flops()
    peak_flops = max(peak_before, peak_after)
    print(f"bf16 matmul peak {peak_flops / 1e12:.3f} TFLOP/s (before the runs {peak_before / 1e12:.3f}, "
          f"after {peak_after / 1e12:.3f})")
    medians, ratios = summarize(runs, peak_flops, params)
    print_table(medians, ratios)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.orig_argv, "peak_flops": peak_flops, "parameters": params,
                                               "settings": vars(args), "runs": runs, "medians": medians,
                                               "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
