"""Generation scoring speed: finetune.py's scoring against the way the previous release scored, on the same run.

    .venv/bin/python bench/bench_scoring.py RUN_FOLDER [--rounds 2] [--json OUT.json]

Both answer the run's test prompts greedily with up to eval_max_new_tokens new tokens, alternately, `--rounds` times:
- before: the previous release's scoring (its evaluate_generation): batches of max(batch_size, 8) prompts in file
  order, tokenizer padding on the left, the adapter applied as separate LoRA layers, stopping at EOS;
- after: finetune.score_generation: the adapter merged into the weights while it runs, prompts sorted by length and
  batched up to a token budget, stopping at EOS or end-of-turn.
It reports the seconds, generated tokens per second and whether every answer is the same. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402


def previous_scoring(model, tokenizer, pairs, max_new_tokens: int, batch_size: int) -> list[str]:
    """The previous release's generate_answers, as its evaluate_generation called it."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    model.eval()
    try:
        for s in range(0, len(pairs), batch_size):
            enc = tokenizer([p.prompt for p in pairs[s:s + batch_size]], return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run trained with raw prompts (as the previous release)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args()
    run = finetune.open_run(args.run)
    cfg, tokenizer = run.cfg, run.tokenizer
    if run.plan.prompt_format != "raw":
        sys.exit("the previous release scored raw prompts only: give a run trained with prompt_format: raw")
    pairs, model = run.test_pairs, finetune.load_finetuned(run)
    results, answers = {"before": [], "after": []}, {}
    for _ in range(args.rounds):
        for kind in results:
            started = time.perf_counter()
            if kind == "before":
                answers[kind] = previous_scoring(model, tokenizer, pairs, cfg.eval_max_new_tokens,
                                                  max(cfg.batch_size, 8))
            else:
                with finetune.adapter_merged(model):
                    answers[kind], tokens = finetune.generate_answers(model, tokenizer, [p.ids for p in pairs],
                                                                      cfg.eval_max_new_tokens, run.plan.stop_ids)
            results[kind].append(time.perf_counter() - started)
    medians = {kind: statistics.median(seconds) for kind, seconds in results.items()}
    same = sum(a == b for a, b in zip(answers["before"], answers["after"]))
    print(f"{len(pairs)} prompts, {tokens} tokens generated, up to {cfg.eval_max_new_tokens} each")
    for kind, seconds in medians.items():
        print(f"{kind:<8}{seconds:8.1f} s {tokens / seconds:8.1f} tokens/s")
    print(f"after / before: {medians['before'] / medians['after']:.2f}x faster; identical answers: {same} of "
          f"{len(pairs)}")
    if args.json:
        flags = sorted(finetune.cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
        Path(args.json).write_text(json.dumps({"run": str(args.run), "cpu_flags": flags, "seconds": results,
                                               "medians": medians, "tokens": tokens, "identical": same,
                                               "prompts": len(pairs)}, indent=2))


if __name__ == "__main__":
    main()
