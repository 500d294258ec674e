"""DPO by finetune.py against TRL's DPOTrainer used as its documentation shows, whole process, on the same pairs.

    .venv/bin/python bench/bench_dpo.py [--steps 100] [--batch-size 8] [--precision bf16|fp32] [--json OUT]

Both train LoRA (r 16, alpha 32, every linear layer) on the base SmolLM2-135M-Instruct from data/demo_pref_train.jsonl
(dates written as YYYY-MM-DD: the right answer chosen, a plausible mistake rejected) as conversations, with the loss
[sigmoid, sft], beta 0.1, the same steps, batch, learning rate, schedule, optimizer and precision, gradient
checkpointing off on both. Each is a fresh child process timed from start to exit (imports, model, data, training,
saving the adapter): finetune.py with no scoring in the run, TRL's trainer as a script (its rows built from the
parsed lines: `load_dataset("json")` reads the answers, ISO dates, as timestamps, which the chat template renders as
"<datetime>", every pair alike; finetune.py reads them as written). Then both adapters are scored
alike by finetune.py's own code on data/demo_pref_test.jsonl (held-out years): greedy exact match, and preference
accuracy and reward margin against the base model. The CPU kind is printed; only same-run ratios compare across
machines. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402  (the repository root is not on the path when this file is run as a script)
from bench_memory import cpu_kind  # noqa: E402

MODEL = ROOT / finetune.EMBEDDED_MODEL
TRAIN, TEST = ROOT / "data" / "demo_pref_train.jsonl", ROOT / "data" / "demo_pref_test.jsonl"

TRL_SCRIPT = """
import json, sys
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

v = json.loads(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(v["model"], dtype=torch.bfloat16 if v["bf16"] else torch.float32)
tokenizer = AutoTokenizer.from_pretrained(v["model"])
# load_dataset("json") would read each answer "2004-08-21" as a timestamp, which the chat template renders as
# "<datetime>": every pair alike. Built from the parsed lines, the answers stay text.
train = Dataset.from_list([json.loads(line) for line in open(v["train"])])
args = DPOConfig(output_dir=v["out"], loss_type=["sigmoid", "sft"], beta=0.1, learning_rate=v["lr"],
                 max_steps=v["steps"], per_device_train_batch_size=v["batch"], bf16=v["bf16"], use_cpu=True,
                 gradient_checkpointing=False, max_length=v["seq_length"], lr_scheduler_type="cosine",
                 warmup_steps=0.03, optim="adamw_torch", logging_steps=10, save_strategy="no", report_to="none",
                 seed=42)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=lora)
trainer.train()
trainer.save_model(v["out"])
"""


def conversations(source: Path, dest: Path) -> Path:
    """The pairs as TRL's conversational preference rows: the prompt a user turn, each answer an assistant turn."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    answers = ("chosen", "rejected")
    dest.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                        **{k: [{"role": "assistant", "content": r[k]}] for k in answers}}) + "\n"
                            for r in rows))
    return dest


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if child.returncode:
        raise RuntimeError(f"{command[1]} failed:\n{child.stderr[-3000:]}")
    return time.perf_counter() - started


def config(args, train: Path, test: Path, out: Path) -> dict:
    return dict(model_name=str(MODEL), stage="dpo", loss_type=["sigmoid", "sft"], beta=0.1, dataset_name=str(train),
                test_dataset=str(test), prompt_format="chat", validation_split=0, eval_strategy="no",
                save_strategy="no", eval_before=False, max_steps=args.steps, batch_size=args.batch_size,
                learning_rate=args.lr, precision=args.precision, seq_length=args.seq_length, peft_lora_r=16,
                peft_lora_alpha=32, peft_lora_dropout=0.0, optim="adamw_torch", logging_steps=10,
                eval_max_new_tokens=16, output_dir=str(out))


def scores(values: dict, adapter: Path) -> dict:
    """finetune.py's scores of an adapter on the test pairs: generation against the chosen answer, and preference
    accuracy and margin against the base model (the adapter off)."""
    from peft import PeftModel

    cfg = finetune.Config(**values)
    tokenizer = finetune.load_tokenizer(cfg)
    plan = finetune.make_plan(cfg, tokenizer, finetune.load_model_config(cfg), finetune.this_machine(), ["dpo"])
    model = PeftModel.from_pretrained(finetune.load_base_model(cfg, plan, for_training=False), adapter)
    pairs = finetune.load_test_pairs(cfg, plan, tokenizer, [])
    found, _ = finetune.score_generation(model, tokenizer, pairs, cfg, plan, adapter.name)
    prefs = finetune.load_test_preferences(cfg, plan, tokenizer, [])
    ref = finetune.test_logps(model, prefs, plan, cfg, tokenizer.pad_token_id, reference=True)
    policy = finetune.test_logps(model, prefs, plan, cfg, tokenizer.pad_token_id)
    return finetune.with_scores(found, finetune.preference_scores(cfg, policy, ref, prefs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        default="bf16" if finetune.cpu_has_bf16() else "fp32")
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args()
    cpu = cpu_kind()
    print(f"CPU: {cpu}; {args.steps} steps of {args.batch_size} pairs, {args.precision}, LoRA, loss [sigmoid, sft]")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, test = conversations(TRAIN, tmp / "train.jsonl"), conversations(TEST, tmp / "test.jsonl")
        ours = config(args, train, test, tmp / "ours")
        (tmp / "ours.yml").write_text(json.dumps(ours))  # JSON is YAML
        seconds = {"finetune.py": timed([sys.executable, str(ROOT / "finetune.py"), "--config", str(tmp / "ours.yml"),
                                         "test_dataset=null"])}
        trl = dict(model=str(MODEL), train=str(train), out=str(tmp / "trl"), lr=args.lr, steps=args.steps,
                   batch=args.batch_size, bf16=args.precision == "bf16", seq_length=args.seq_length)
        seconds["TRL DPOTrainer"] = timed([sys.executable, "-c", TRL_SCRIPT, json.dumps(trl)])
        found = {"finetune.py": scores(ours, tmp / "ours"), "TRL DPOTrainer": scores(ours, tmp / "trl")}
    print(f"\n{'':<16}{'seconds':>9}{'exact':>8}{'token F1':>10}{'pref acc':>10}{'margin':>8}{'chosen logp':>13}")
    for name, s in found.items():
        print(f"{name:<16}{seconds[name]:>9.1f}{s['exact_match']:>8.3f}{s['token_f1']:>10.3f}"
              f"{s['preference_accuracy']:>10.3f}{s['reward_margin']:>8.3f}{s['chosen_logp']:>13.2f}")
    print(f"speed-up (whole process): {seconds['TRL DPOTrainer'] / seconds['finetune.py']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "args": vars(args), "seconds": seconds, "scores": found},
                                              indent=2))


if __name__ == "__main__":
    main()
