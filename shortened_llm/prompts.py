"""The Alpaca prompt template and instruction records, as the paper's LoRA retraining uses them.

The official code (``src/LLMPruner/utils/prompter.py``, after Alpaca-LoRA) formats every
record with the Alpaca template and trains only on the response: the prompt's tokens get
label -100 (``train_on_inputs=False``), and the full text ends with EOS when it fits.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["ALPACA_TEMPLATE", "REQUIRED_FIELDS", "alpaca_prompt", "response_of", "load_instructions", "tokenize_record"]

ALPACA_TEMPLATE = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
    "response_split": "### Response:",
}
REQUIRED_FIELDS = ("instruction", "output")  # "input" is optional (empty in most Alpaca records)


def alpaca_prompt(instruction: str, input: str | None = None, output: str | None = None) -> str:
    """The prompt for ``instruction`` (and ``input``), followed by ``output`` when given (training text)."""
    if input:
        text = ALPACA_TEMPLATE["prompt_input"].format(instruction=instruction, input=input)
    else:
        text = ALPACA_TEMPLATE["prompt_no_input"].format(instruction=instruction)
    return text + output if output else text


def response_of(generated: str) -> str:
    """The answer part of a generated text (what follows ``### Response:``)."""
    _, sep, after = generated.partition(ALPACA_TEMPLATE["response_split"])
    return (after if sep else generated).strip()


def load_instructions(source: "str | os.PathLike | list[dict]" = "alpaca") -> list[dict]:
    """Instruction records from a dataset name, a JSON/JSONL file, or a list; fields checked.

    Every record needs ``instruction`` and ``output`` (``input`` may be missing or empty),
    as in yahma/alpaca-cleaned; a record without them is an error naming it.
    """
    from .data import DATASETS, load_records

    where = "records"
    if isinstance(source, (list, tuple)):
        records = list(source)
    elif str(source) in DATASETS:
        records, where = load_records(str(source)), f"dataset {str(source)!r}"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"data={str(source)!r} is neither a dataset name ({', '.join(sorted(DATASETS))}) nor a JSON/JSONL file")
        text = path.read_text()
        try:
            records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"data file {str(path)!r} is not JSON (a list of records) or JSONL: {err}") from None
        where = f"data file {str(path)!r}"
    if not records:
        raise ValueError(f"{where} holds no records")
    for i, rec in enumerate(records):
        missing = [f for f in REQUIRED_FIELDS if not isinstance(rec, dict) or not isinstance(rec.get(f), str)]
        if missing:
            raise ValueError(
                f"record {i} of {where} lacks field(s) {missing}: every record needs "
                f"{', '.join(REQUIRED_FIELDS)} (and optionally input), as in yahma/alpaca-cleaned")
    return [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in records]


def tokenize_record(tokenizer, record: dict, cutoff: int, train_on_inputs: bool = False) -> dict:
    """``input_ids`` and ``labels`` (prompt masked with -100) of one record, at most ``cutoff`` tokens.

    As the official script: EOS is appended when the text is shorter than ``cutoff``; the
    prompt length is that of the prompt tokenized alone.
    """
    if cutoff < 1:
        raise ValueError(f"cutoff={cutoff} must be >= 1: it is the most tokens kept per training example")
    full = tokenizer(alpaca_prompt(record["instruction"], record["input"], record["output"]),
                     truncation=True, max_length=cutoff).input_ids
    if tokenizer.eos_token_id is not None and full[-1] != tokenizer.eos_token_id and len(full) < cutoff:
        full = full + [tokenizer.eos_token_id]
    labels = list(full)
    if not train_on_inputs:
        n_prompt = len(tokenizer(alpaca_prompt(record["instruction"], record["input"]),
                                 truncation=True, max_length=cutoff).input_ids)
        labels = [-100] * n_prompt + labels[n_prompt:]
    return {"input_ids": full, "labels": labels[: len(full)]}
