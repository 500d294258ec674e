"""How `finetune.py --validate` scales with the number of dataset rows: wall time and peak memory of the whole run.

    .venv/bin/python bench/bench_data.py [--rows 1000 10000 100000] [--shape messages sharegpt]
        [--second-run [ROWS ...]] [--python PATH] [--repo PATH] [--timeout 600] [--json OUT.json]

The data is a synthetic chat `messages` jsonl file per row count (system, user, assistant, user, assistant; sentences
of a fixed seeded vocabulary), ~1,500 tokens per row median with SmolLM2's tokenizer, about 1 row in 8 over seq_length
2048 so that the truncation pass runs too. It is written once into /tmp/finetune-bench-data/ and reused. --shape
sharegpt rewrites each row as ShareGPT ({conversations: [{from, value}]}, human/gpt), the same conversations.

Each run is `PYTHON REPO/finetune.py --validate --config CONFIG` with REPO's embedded SmolLM2-135M-Instruct, that
file, seq_length 2048 and validation_split 0.01, from a fresh temporary folder and a fresh HF_DATASETS_CACHE, so that
the run really reads and tokenizes; --second-run runs again on that warm cache, from a fresh folder and output_dir
as a user's next run would (what it reuses is up to finetune.py's cache keys). Per run: the wall time; the peak of
the RSS summed over the process and all its descendants (polled every 0.2 s, so a shorter spike can be missed, and
pages shared between processes count once per process); and the largest single process (ru_maxrss from wait4,
exact). --repo points at another checkout (a git worktree of an older commit) to compare code on the same data.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path("models/SmolLM2-135M-Instruct")  # relative to --repo
DATA_DIR = Path("/tmp/finetune-bench-data")
MEDIAN_TOKENS, SEQ_LENGTH, SEED = 1500, 2048, 0
POLL_S = 0.2
# finetune.py's --validate summary line: "total: ...; tokens per example: min A, median B, max C; ..."
MEDIAN_RE = re.compile(r"^total: .*tokens per example: min \d+, median (\d+)", re.MULTILINE)

SUBJECTS = ("The new release", "Our team", "This function", "The customer", "A careful reviewer", "The recipe",
            "The city council", "Your application", "The training run", "The quarterly report", "The database",
            "Every worker", "The support engineer", "The museum guide", "This approach", "The build server",
            "The finance team", "A good teacher", "The mobile app", "The research group")
VERBS = ("improves", "describes", "replaces", "checks", "explains", "reduces", "depends on", "measures", "caches",
         "summarizes", "validates", "schedules", "translates", "compares", "documents", "rewrites", "tracks",
         "simplifies", "protects", "estimates")
OBJECTS = ("the memory use of each worker", "the schedule for next week", "every row of the input file",
           "the cost of shipping to Canada", "the history of the old bridge", "the login page", "the error messages",
           "the results of the last experiment", "the list of open issues", "the temperature of the oven",
           "the size of the final model", "the customer's first question", "the budget for 2025",
           "the slowest query in the system", "a map of the northern trails", "the tests that failed overnight",
           "the notes from Tuesday's meeting", "three ways to split the data", "the \"quick start\" guide",
           "the backup of the main server")
TAILS = ("before the deadline.", "without any extra cost.", "when the cache is warm.", "in about 20 minutes.",
         "so that nobody has to guess.", "for every region at once.", "and nothing else changes.",
         "once the review is done.", "with a single command.", "as the manual recommends.",
         "even on a slow laptop.", "which saves about 15% of the time.", "at the end of each month.",
         "while the old version keeps running.", "using the numbers from last year.", "step by step.",
         "if the input is valid.", "and reports what it found.", "for the next 3 releases.", "by hand, for now.")
QUESTIONS = ("How does {s} handle {o}?", "Why does {s} need {o} at all?", "Can you explain what {s} does with {o}?",
             "What happens to {o} when {s} stops?", "Is there a faster way to get {o}?",
             "Could you give me an example of {o}, with numbers?")
SYSTEM_PROMPTS = ("You are a helpful assistant. Answer clearly and completely.",
                  "You are an expert technical writer. Explain each step and give concrete examples.",
                  "You are a friendly support agent for a software company. Be precise and polite.",
                  "You are a tutor. Explain the reasoning behind every answer in plain language.")
TURN_SHARES = (0.1, 0.4, 0.1, 0.4)  # of a row's token budget: user, assistant, user, assistant
ROLES = ("user", "assistant", "user", "assistant")
MARKER_TOKENS = 5  # the chat template's tokens around each message: <|im_start|>role\n ... <|im_end|>\n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 100000], help="dataset sizes to run")
    parser.add_argument("--shape", nargs="+", choices=["messages", "sharegpt"], default=["messages"],
                        help="the rows' shape (the same conversations in each)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs finetune.py")
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose finetune.py and model are run")
    parser.add_argument("--second-run", type=int, nargs="*", metavar="ROWS",
                        help="also time a run on the warm datasets cache: for every row count, or for those given")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run is stopped and reported")
    parser.add_argument("--json", metavar="OUT.json", help="write every run's numbers here")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Data: paragraphs of seeded sentences, counted once with the tokenizer, joined into rows by a token budget
# ---------------------------------------------------------------------------------------------------------------------

def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"


def paragraph(rng: random.Random) -> str:
    """Prose, or now and then a numbered list, as assistants write."""
    if rng.random() < 0.2:
        return "\n".join(f"{i}. {sentence(rng)}" for i in range(1, rng.randint(3, 6)))
    return " ".join(sentence(rng) for _ in range(rng.randint(2, 7)))


def question(rng: random.Random) -> str:
    return rng.choice(QUESTIONS).format(s=rng.choice(SUBJECTS).lower(), o=rng.choice(OBJECTS))


def counted(texts: list[str], tokenizer) -> list[tuple[str, int]]:
    """(the text escaped for a JSON string, without quotes; its tokens): rows are then joined as plain strings, which
    writes 100k rows in seconds where json.dumps of each row would take minutes."""
    return [(json.dumps(t)[1:-1], len(ids)) for t, ids in zip(texts, tokenizer.encode_batch_fast(texts))]


def message_text(pool: list[tuple[str, int]], budget: int, rng: random.Random, parts: list[str], tokens: int) -> str:
    """`parts` (of `tokens` tokens) and paragraphs, each taken while it ends no more than half its length past the
    budget: messages land on their budget on average."""
    while True:
        text, n = pool[rng.randrange(len(pool))]
        if parts and tokens + n / 2 > budget:
            return "\\n\\n".join(parts)
        parts.append(text)
        tokens += n + 1  # +1: the blank line between paragraphs


def opening(role: str, questions: list[tuple[str, int]], rng: random.Random) -> tuple[list[str], int]:
    """A user turn opens with a question; an assistant turn with nothing."""
    if role != "user":
        return [], 0
    text, n = rng.choice(questions)
    return [text], n


def write_rows(path: Path, count: int, tokenizer) -> None:
    rng = random.Random(SEED)
    paragraphs = counted([paragraph(rng) for _ in range(2000)], tokenizer)
    questions = counted([question(rng) for _ in range(200)], tokenizer)
    systems = counted(list(SYSTEM_PROMPTS), tokenizer)
    head = '{"messages": [{"role": "system", "content": "'
    with path.open("w") as f:
        for _ in range(count):
            # Log-normal row lengths around the median: about 1 row in 8 is longer than seq_length.
            row_tokens = min(4 * MEDIAN_TOKENS, int(rng.lognormvariate(math.log(MEDIAN_TOKENS), 0.25)))
            system, system_tokens = rng.choice(systems)
            budget = row_tokens - system_tokens - MARKER_TOKENS * (1 + len(ROLES))
            turns = [f'{{"role": "{role}", "content": "' + message_text(paragraphs, int(budget * share), rng,
                                                                     *opening(role, questions, rng)) + '"}'
                     for role, share in zip(ROLES, TURN_SHARES)]
            f.write(head + system + '"}, ' + ", ".join(turns) + "]}\n")


SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def dataset_file(rows: int, repo: Path, shape: str = "messages") -> Path:
    """The data file of `rows` rows, written once (to a temporary name first: an interrupted write is never reused)."""
    if shape == "sharegpt":
        path, messages = DATA_DIR / f"sharegpt-{rows}.jsonl", dataset_file(rows, repo)
        if not path.exists():
            partial = path.with_suffix(".partial")
            with messages.open() as source, partial.open("w") as f:
                for line in source:
                    turns = [{"from": SHAREGPT_NAMES[m["role"]], "value": m["content"]}
                             for m in json.loads(line)["messages"]]
                    f.write(json.dumps({"conversations": turns}) + "\n")
            partial.rename(path)
        return path
    path = DATA_DIR / f"chat-{rows}.jsonl"
    if not path.exists():
        from tokenizers import Tokenizer

        DATA_DIR.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        partial = path.with_suffix(".partial")
        write_rows(partial, rows, Tokenizer.from_file(str(repo / MODEL / "tokenizer.json")))
        partial.rename(path)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f} s",
              flush=True)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# One measured run: the process tree's RSS polled, the largest process from wait4
# ---------------------------------------------------------------------------------------------------------------------

def tree_rss(process: psutil.Process) -> int:
    """RSS of the process and all its descendants; processes that end while this reads them count as 0."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_validate(args: argparse.Namespace, data: Path, cache: Path, folder: Path) -> dict:
    """One `finetune.py --validate` run in `folder`, on the datasets cache `cache`."""
    config = folder / "config.yml"
    config.write_text(json.dumps({"model_name": str(args.repo / MODEL), "dataset_name": str(data),
                                  "seq_length": SEQ_LENGTH, "validation_split": 0.01,
                                  "output_dir": str(folder / "output")}))  # JSON is YAML
    # No allocator setting inherited from this shell: each run starts as a user's would.
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FINETUNE_NO_REEXEC")}
    env["HF_DATASETS_CACHE"] = str(cache)
    command = [args.python, str(args.repo / "finetune.py"), "--validate", "--config", str(config)]
    with (folder / "stdout").open("w") as out, (folder / "stderr").open("w") as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=err, start_new_session=True)
        process, peak, usage, timed_out = psutil.Process(child.pid), 0, None, False
        try:
            while usage is None:
                peak = max(peak, tree_rss(process))
                pid, status, rusage = os.wait4(child.pid, os.WNOHANG)  # not child.poll(): wait4 gives the rusage
                if pid:
                    usage, child.returncode = rusage, os.waitstatus_to_exitcode(status)
                elif time.perf_counter() - started > args.timeout:
                    timed_out = True
                    os.killpg(child.pid, signal.SIGKILL)  # its own session: the workers it spawned go too
                else:
                    time.sleep(POLL_S)
        finally:
            if usage is None:  # Ctrl-C here: the run is in its own session, so it would not get the signal
                os.killpg(child.pid, signal.SIGKILL)
        wall = time.perf_counter() - started
    stdout, stderr = (folder / "stdout").read_text(), (folder / "stderr").read_text()
    median = MEDIAN_RE.search(stdout)
    return {"ok": child.returncode == 0, "exit": child.returncode, "timed_out": timed_out, "wall_s": wall,
            "peak_tree_rss_gb": peak / 2**30, "max_process_rss_gb": usage.ru_maxrss / 2**20,  # ru_maxrss is in KiB
            "median_tokens": int(median.group(1)) if median else None, "stderr_tail": stderr[-2000:]}


def measure(rows: int, shape: str, args: argparse.Namespace) -> list[dict]:
    """The cold run of `rows` rows and, with --second-run, the warm one on its cache."""
    data = dataset_file(rows, args.repo, shape)
    warm = args.second_run is not None and (not args.second_run or rows in args.second_run)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        cache = Path(tmp) / "hf-datasets"
        for cache_state in ("cold", "warm")[:1 + warm]:
            folder = Path(tempfile.mkdtemp(prefix=f"{cache_state}-", dir=tmp))
            run = {"rows": rows, "shape": shape, "file_mb": data.stat().st_size / 1e6, "cache": cache_state}
            run |= run_validate(args, data, cache, folder)
            results.append(run)
            print_run(run)
            if not run["ok"]:
                print(f"  run failed (exit {run['exit']}{', timed out' if run['timed_out'] else ''}); stderr tail:\n"
                      f"{run['stderr_tail']}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------

def cpu_kind() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    flags = set(flags.split(":", 1)[1].split())
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "AVX2"


def repo_commit(repo: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


HEADER = (f"{'rows':>8} {'shape':>9} {'cache':>6} {'file MB':>8} {'tokens':>7} {'wall s':>8} {'tree RSS GB':>12} "
          f"{'max proc GB':>12}")


def print_run(run: dict) -> None:
    tokens = run["median_tokens"] if run["median_tokens"] is not None else "-"
    print(f"{run['rows']:>8} {run['shape']:>9} {run['cache']:>6} {run['file_mb']:>8.0f} {tokens:>7} "
          f"{run['wall_s']:>8.1f} "
          f"{run['peak_tree_rss_gb']:>12.2f} {run['max_process_rss_gb']:>12.2f}{'' if run['ok'] else '  FAILED'}",
          flush=True)


def main() -> None:
    args = parse_args()
    args.repo = args.repo.resolve()
    setup = {"command": sys.orig_argv, "cpu": cpu_kind(), "cores": os.cpu_count(), "python": args.python,
             "repo": str(args.repo), "commit": repo_commit(args.repo)}
    print("command:", shlex.join(sys.orig_argv))
    print(f"CPU kind {setup['cpu']}, {setup['cores']} cores; finetune.py of {args.repo} at {setup['commit']}")
    print("tokens = median tokens per example as finetune.py reports them; RSS in GiB")
    print(HEADER, flush=True)
    runs = [run for rows in args.rows for shape in args.shape for run in measure(rows, shape, args)]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(setup | {"runs": runs}, indent=2))


if __name__ == "__main__":
    main()
