"""An independent evaluation of a finished run's adapter, to check the before/after table the run printed.

    .venv/bin/python bench/check_scores.py OUTPUT_DIR

Nothing of finetune.py's scoring is used: the base model and the adapter are loaded with transformers and PEFT as
their documentation shows, each test prompt (the run's own test_dataset, prompt/completion rows, raw prompts) is
answered alone by plain `generate` in fp32 (no batching, no padding; the adapter merged by PEFT's merge_and_unload),
and exact match is counted here. Prints both exact-match figures and the rows where the two answers differ. A check,
not a test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    run = Path(sys.argv[1])
    config = yaml.safe_load((run / "config.yml").read_text())
    summary = json.loads((run / "eval.json").read_text())
    rows = [json.loads(line) for line in Path(config["test_dataset"]).read_text().splitlines() if line.strip()]
    rows = rows[:config["eval_max_examples"]]
    tokenizer = AutoTokenizer.from_pretrained(run)
    base = AutoModelForCausalLM.from_pretrained(config["model_name"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run).merge_and_unload().eval()
    stops = json.loads((run / "generation_config.json").read_text())["eos_token_id"]
    right, differ = 0, []
    wrong = {w["prompt"]: w["answer"] for w in summary["wrong"]}
    for row in rows:
        ids = tokenizer(row["prompt"], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=config["eval_max_new_tokens"], do_sample=False,
                                 eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        right += answer.strip() == row["completion"].strip()
        if answer != wrong.get(row["prompt"], row["completion"]) and answer.strip() != row["completion"].strip():
            differ.append({"prompt": row["prompt"], "here": answer, "run": wrong.get(row["prompt"])})
    print(f"exact match: the run's table {summary['fine_tuned']['exact_match']:.3f}, this evaluation "
          f"{right / len(rows):.3f} ({right} of {len(rows)})")
    print(f"rows answered differently: {len(differ)}")
    for d in differ:
        print(json.dumps(d))


if __name__ == "__main__":
    main()
