"""The demo datasets in the shapes users bring from the Hub, written from the demo files make_demo.py writes:

demo_alpaca_train/test.jsonl (Alpaca: instruction, input, output): the JSON-record task of demo_train/demo_test.
demo_sharegpt_train/test.parquet (ShareGPT: conversations of {from, value}, a tools column of JSON text): the
    function-calling task of demo_tools_train/demo_tools_test, its calls as function_call turns, its results as
    observation turns.
demo_openai_train/test.jsonl (OpenAI fine-tuning rows: messages with weight): two confirmations of the chat task of
    demo_chat_train/demo_chat_test in one conversation, the first reply weight 0 (shown, not trained).

Each holds the same rows as its source, so a run on it can be compared with a run on the source.
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
INSTRUCTION = "Convert the request into a JSON record."


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]


def write_jsonl(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def alpaca_row(row: dict) -> dict:
    request = row["prompt"].split("\nRequest: ", 1)[1].removesuffix("\nJSON:")
    return {"instruction": INSTRUCTION, "input": request, "output": row["completion"].strip()}


def sharegpt_turn(message: dict) -> dict:
    if message.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                 for c in message["tool_calls"]]
        return {"from": "function_call", "value": json.dumps(calls[0] if len(calls) == 1 else calls)}
    role = {"user": "human", "assistant": "gpt", "tool": "observation", "system": "system"}[message["role"]]
    return {"from": role, "value": message["content"]}


def sharegpt_table(rows: list[dict]) -> pa.Table:
    return pa.table({"conversations": [[sharegpt_turn(m) for m in row["messages"]] for row in rows],
                     "tools": [json.dumps(row["tools"]) for row in rows]})


def openai_rows(rows: list[dict]) -> list[dict]:
    """Rows two by two: the first exchange shown (weight 0), the second trained."""
    paired = []
    for first, second in zip(rows[::2], rows[1::2]):
        system, question, answer = first["messages"]
        paired.append({"messages": [system, question, {**answer, "weight": 0}, *second["messages"][1:]]})
    return paired


def main() -> None:
    for split in ("train", "test"):
        write_jsonl(f"demo_alpaca_{split}.jsonl", [alpaca_row(r) for r in read_jsonl(f"demo_{split}.jsonl")])
        pq.write_table(sharegpt_table(read_jsonl(f"demo_tools_{split}.jsonl")), HERE / f"demo_sharegpt_{split}.parquet")
        write_jsonl(f"demo_openai_{split}.jsonl", openai_rows(read_jsonl(f"demo_chat_{split}.jsonl")))


if __name__ == "__main__":
    main()
