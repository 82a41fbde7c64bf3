"""``hmora-ds generate``: answers for a JSONL file of prompts, written as JSONL.

    hmora-ds generate --model smollm2-135m-instruct --adapter DIR --input q.jsonl --output a.jsonl

Each input line is an object with one of: ``prompt`` (a user message), ``source`` (our
training records), ``instruction`` (+ optional ``input``, alpaca) or ``messages`` (a
conversation ending with the user turn to answer, checked by the rules of training data:
OpenAI ``role``/``content`` or ShareGPT ``from``/``value``, see docs/data.md); ``system`` is an
optional system prompt. Each output line is the input object with ``response`` added, in input
order. A line that cannot be used is reported with its line number and the run stops before
loading the model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hmora_ds.chat import add_model_arguments, build_generator, check_numbers
from hmora_ds.cli import Parser, configure_logging, prog_name


def conversation(row: Any, where: str) -> list[dict[str, str]]:
    """The conversation to answer for one input line.

    Raises:
        ValueError: one line naming ``where`` (file:line) and the accepted fields.
    """
    from hmora_ds.data.formats import alpaca_prompt
    from hmora_ds.inference import check_messages

    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    system = row.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    if "messages" in row:
        msgs = check_messages(row["messages"], where)
        return [*head, *msgs] if head and msgs[0]["role"] != "system" else msgs
    for key in ("prompt", "source"):
        if isinstance(row.get(key), str) and row[key].strip():
            return [*head, {"role": "user", "content": row[key]}]
    if isinstance(row.get("instruction"), str) and row["instruction"].strip():
        extra = row.get("input")
        text = alpaca_prompt(row["instruction"], extra if isinstance(extra, str) else None)
        return [*head, {"role": "user", "content": text}]
    raise ValueError(
        f"{where}: no prompt; give one of prompt, source, instruction (+ input) or messages"
    )


def read_inputs(path: Path) -> list[tuple[dict, list[dict[str, str]]]]:
    """Every line of ``path`` with its conversation. Raises ValueError on the first bad line."""
    if not path.is_file():
        raise ValueError(f"--input: {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: invalid JSON ({err.msg})") from None
        rows.append((row, conversation(row, f"{path}:{n}")))
    if not rows:
        raise ValueError(f"--input: {path} has no lines")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog=prog_name("hmora_ds.generate"), description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--input", type=Path, required=True, help="JSONL of prompts")
    p.add_argument("--output", type=Path, required=True, help="JSONL written with 'response'")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    args = p.parse_args(argv)
    try:
        check_numbers(args)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
        rows = read_inputs(args.input)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        gen = build_generator(args)
        # Encoded once, before any generation: a prompt that cannot fit stops the run here.
        encoded = [gen.encode(conv)[0] for _, conv in rows]
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    # Similar lengths share a batch (less padding); the output keeps the input order.
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i]["input_ids"]))
    answers: dict[int, str] = {}
    for start in tqdm(range(0, len(order), args.batch_size), desc="generate", unit="batch"):
        chunk = order[start : start + args.batch_size]
        for i, text in zip(chunk, gen.answer_encoded([encoded[i] for i in chunk]), strict=True):
            answers[i] = text
    tmp = args.output.with_name(args.output.name + ".tmp")
    with tmp.open("w") as f:
        for i, (row, _) in enumerate(rows):
            f.write(json.dumps({**row, "response": answers[i]}, ensure_ascii=False) + "\n")
    tmp.replace(args.output)
    print(f"{len(rows)} answers written to {args.output}")
    return 0


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
