"""Datasets by name, from the offline pack (``$SHORTENED_LLM_DATA``) or the Hugging Face hub.

The pack is laid out like ``shared/data`` (see its SOURCES.md). Its known gaps: public-domain
books stand in for BookCorpus, Alpaca has 1000 records, HellaSwag lacks ctx_a/ctx_b.
Without the pack, the same names load the datasets the official code uses from the hub
(or its local cache when ``HF_DATASETS_OFFLINE=1``). A streamed hub dataset (SlimPajama, the
paper's CPT corpus, 627B tokens) is read up to its ``stream_rows``; the pack has none of it.

The stand-ins are fine for learning and wrong for comparing with the paper's tables, so a
preset that ``requires_original_data`` (``paper``) refuses them unless told otherwise
(``check_original_data``), and what it ran on is then recorded as "substitute data".
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import unknown_name

__all__ = ["DATASETS", "PACK_STANDINS", "ALLOW_SUBSTITUTE_ENV", "data_dir", "load_texts", "load_records",
           "calibration_batches", "encoded_once", "tokenizer_key", "set_offline_if_pack", "standins_in_use",
           "substitutes_allowed", "check_original_data"]


def data_dir() -> Path | None:
    """The offline pack, if ``SHORTENED_LLM_DATA`` points to one."""
    value = os.environ.get("SHORTENED_LLM_DATA")
    return Path(value).expanduser().resolve() if value else None


def set_offline_if_pack() -> None:
    """With the pack in use nothing should wait on a network: tell HF libraries so."""
    if data_dir() is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# ---- local readers: one per file layout in the pack ---------------------------------------

def _wikitext_rows(path: Path) -> list[str]:
    # SOURCES.md: one HF row per line, empty rows stored as " \n"
    return [line if line.strip() else "" for line in path.read_text().splitlines(keepends=True)]


def _ptb_sentences(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()]


def _book_passages(folder: Path, min_chars: int = 2000) -> list[str]:
    """Books cut into passages of whole paragraphs, each at least ``min_chars`` long.

    BookCorpus rows are pieces of novels; the official sampler draws rows that are at
    least ``seq_len`` tokens long, so our rows are long enough to hold a 128-token window.
    """
    passages = []
    for book in sorted(folder.glob("*.txt")):
        current = []
        for para in book.read_text().split("\n\n"):
            para = " ".join(para.split())
            if not para:
                continue
            current.append(para)
            if sum(map(len, current)) >= min_chars:
                passages.append("\n\n".join(current))
                current = []
    return passages


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_list(path: Path) -> list[dict]:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class DatasetSpec:
    local: str  # path inside the pack ("": hub only)
    read: Callable[[Path], list]
    hub: tuple  # load_dataset(*hub_args, split=split)
    split: str
    field: str | None  # text field of a hub row (None: rows are records)
    note: str = ""
    stream_rows: int | None = None  # a streamed hub dataset: rows read from its start (None: the whole split)


DATASETS: dict[str, DatasetSpec] = {
    "wikitext2": DatasetSpec("wikitext2/wiki.test.raw", _wikitext_rows, ("wikitext", "wikitext-2-raw-v1"), "test", "text"),
    "ptb": DatasetSpec("ptb/ptb.valid.txt", _ptb_sentences, ("ptb_text_only", "penn_treebank"), "validation", "sentence"),
    "bookcorpus": DatasetSpec(
        "books", _book_passages, ("bookcorpus",), "train", "text",
        note="the pack substitutes public-domain novels for BookCorpus",
    ),
    "c4": DatasetSpec(
        "cpt/c4_en_train_00000_first1000.jsonl", lambda p: [r["text"] for r in _jsonl(p)],
        ("allenai/c4",), "train", "text", note="pack: first 1000 rows of en/c4-train.00000-of-01024",
    ),
    # The paper's CPT corpus (627B tokens), streamed: no pack file. 200k rows ~ 0.2B tokens (about 1k
    # tokens per row) is a few thousand optimizer steps at the paper's batch; more via stream_rows.
    "slimpajama": DatasetSpec(
        "", _jsonl, ("cerebras/SlimPajama-627B",), "train", "text",
        note="hub only, streamed: the first stream_rows rows", stream_rows=200_000,
    ),
    "alpaca": DatasetSpec(
        "alpaca/alpaca_data_cleaned_first1000.json", _json_list, ("yahma/alpaca-cleaned",), "train", None,
        note="pack: first 1000 records",
    ),
}


def _unknown(name: str) -> ValueError:
    return unknown_name("dataset", name, sorted(DATASETS))


@functools.lru_cache(maxsize=16)
def _load(name: str, pack: Path | None) -> tuple:
    spec = DATASETS[name]
    if pack is not None and spec.local:
        path = pack / spec.local
        if path.exists():
            return tuple(spec.read(path))
    try:
        from datasets import load_dataset

        if spec.stream_rows is not None:  # never downloaded whole: the first rows of the stream
            stream = load_dataset(*spec.hub, split=spec.split, streaming=True)
            rows = [row for _, row in zip(range(spec.stream_rows), stream)]
            return tuple(r[spec.field] for r in rows) if spec.field else tuple(dict(r) for r in rows)
        rows = load_dataset(*spec.hub, split=spec.split)
    except Exception as err:  # the hub raises many types; all mean "not available here"
        where = ("the offline pack has no copy" if not spec.local else f"{pack / spec.local} does not exist") if pack \
            else "SHORTENED_LLM_DATA is not set"
        raise FileNotFoundError(
            f"dataset {name!r} is not available: {where}, and the Hugging Face hub dataset "
            f"{'/'.join(spec.hub)} (split {spec.split!r}) could not be loaded ({type(err).__name__}: {err}). "
            "Point SHORTENED_LLM_DATA to the offline pack, or go online / fill the HF cache."
        ) from None
    return tuple(rows[spec.field]) if spec.field else tuple(dict(r) for r in rows)


# ---- stand-ins: where the pack is not the data the paper used --------------------------------

# name -> what the pack puts in its place (SOURCES.md); "hellaswag" is a zero-shot task's file
PACK_STANDINS = {
    "bookcorpus": "public-domain novels (books/) stand in for BookCorpus",
    "hellaswag": "a lossy HellaSwag (zeroshot/hellaswag.jsonl: ctx_b lost, so contexts are not capitalised as lm-eval's)",
}
_STANDIN_FILES = {"bookcorpus": DATASETS["bookcorpus"].local, "hellaswag": "zeroshot/hellaswag.jsonl"}
ALLOW_SUBSTITUTE_ENV = "SHORTENED_LLM_ALLOW_SUBSTITUTE"


def standins_in_use() -> dict[str, str]:
    """The stand-ins this environment reads (``{name: what}``): those the pack holds, none without it."""
    pack = data_dir()
    if pack is None:
        return {}
    return {name: what for name, what in PACK_STANDINS.items() if (pack / _STANDIN_FILES[name]).exists()}


def substitutes_allowed(preset) -> bool:
    """Whether ``preset`` may run on stand-ins: its ``allow_substitute_data``, or ``$SHORTENED_LLM_ALLOW_SUBSTITUTE=1``."""
    return bool(preset.allow_substitute_data) or os.environ.get(ALLOW_SUBSTITUTE_ENV, "") == "1"


def check_original_data(preset) -> dict[str, str]:
    """Refuse a preset meant for the paper's tables on stand-in data, unless allowed; return the stand-ins used.

    A preset that does not ``requires_original_data`` (the CPU presets) is never refused; what
    it returns is what its outputs must then record as "substitute data".
    """
    used = standins_in_use()
    if used and preset.requires_original_data and not substitutes_allowed(preset):
        names = " and ".join(f"{name} ({what})" for name, what in used.items())
        raise ValueError(
            f"preset {preset.name!r} is the paper's protocol, but SHORTENED_LLM_DATA={data_dir()} substitutes "
            f"{names}: unset SHORTENED_LLM_DATA to read the original datasets from the hub, or opt in with "
            f"--allow-substitute-data (allow_substitute_data=True, or {ALLOW_SUBSTITUTE_ENV}=1) and every output "
            "says 'substitute data'")
    return used


def load_texts(name: str) -> list[str]:
    """The text rows of a dataset (WikiText-2 test rows, PTB validation sentences, ...)."""
    if name not in DATASETS:
        raise _unknown(name)
    rows = _load(name, data_dir())
    if rows and not isinstance(rows[0], str):
        raise ValueError(f"dataset {name!r} holds records, not texts: use load_records")
    return list(rows)


def load_records(name: str) -> list[dict]:
    """Records of a structured dataset (``alpaca``: instruction, input, output)."""
    if name not in DATASETS:
        raise _unknown(name)
    return [dict(r) for r in _load(name, data_dir())]


def calibration_batches(
    tokenizer,
    n_samples: int = 10,
    seq_len: int = 128,
    seed: int = 1234,
    dataset: str = "bookcorpus",
    bos_every: bool = False,
) -> torch.Tensor:
    """``(n_samples, seq_len)`` token ids drawn as the official ``get_examples`` draws them.

    Pick a random row long enough for a window (never the same row twice), then a random
    ``seq_len`` window of its tokens. ``bos_every`` puts BOS first in every sample (Gemma).
    """
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"n_samples={n_samples} must be >= 1 and seq_len={seq_len} >= 2 (one predicted token)")
    if bos_every and tokenizer.bos_token_id is None:
        raise ValueError("bos_every=True but the tokenizer has no BOS token")
    rows = load_texts(dataset)
    rng = random.Random(seed)
    samples, used = [], set()
    for _ in range(n_samples):
        for _attempt in range(100 * len(rows)):
            i = rng.randrange(len(rows))
            ids = tokenizer(rows[i], add_special_tokens=not bos_every).input_ids
            if len(ids) >= seq_len and i not in used:
                used.add(i)
                break
        else:
            raise ValueError(f"dataset {dataset!r} has fewer than {n_samples} rows with >= {seq_len} tokens")
        j = rng.randint(0, len(ids) - seq_len)
        window = ids[j : j + seq_len]
        if bos_every:
            window = [tokenizer.bos_token_id] + window[:-1]
        samples.append(window)
    return torch.tensor(samples, dtype=torch.long)  # (n_samples, seq_len)


# ---- text encoded once per process, per tokenizer ------------------------------------------

def tokenizer_key(tokenizer):
    """What a tokenizer computes, as a hashable key: a digest of its fast tokenizer (vocabulary, merges,
    normalizer, special tokens, post-processor) and the Python-side options that change ``tokenizer(text)``.

    A dense model and every model pruned from it are loaded with their own tokenizer objects, all
    equal: keyed by content, a corpus they encode is encoded once (WikiText-2 once per process, not
    once per evaluated model; C4 once, not once per training run). A tokenizer without a fast backend
    is keyed by the object itself (held by the key, so its id cannot be reused by another).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return ("object", tokenizer)
    size = len(tokenizer)  # a token added since the digest was taken changes the length
    remembered = _weakrefable(tokenizer)
    known = _DIGESTS.get(tokenizer) if remembered else None
    if known is None or known[0] != size:
        options = {k: getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token", "split_special_tokens")}
        text = f"{type(tokenizer).__name__}|{sorted(options.items())}|{backend.to_str()}"
        known = (size, hashlib.sha256(text.encode()).hexdigest())
        if remembered:
            _DIGESTS[tokenizer] = known
    return ("content", known[1])


_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (len, digest): 80 ms a digest


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False


def encoded_once(maxsize: int = 8):
    """Cache ``fn(tokenizer, *args)`` (``args`` hashable) by ``tokenizer_key``, the last ``maxsize`` results.

    For encodings of whole corpora, which take seconds (C4's 1000 rows: about 2 s on one core) and
    are asked for again by every model and every run of a process. The cached value is shared:
    callers copy before changing it.
    """
    def wrap(fn):
        store: OrderedDict = OrderedDict()

        @functools.wraps(fn)
        def cached(tokenizer, *args):
            key = (tokenizer_key(tokenizer), *args)
            if key in store:
                store.move_to_end(key)
                return store[key]
            value = store[key] = fn(tokenizer, *args)
            if len(store) > maxsize:
                store.popitem(last=False)
            return value

        cached.cache_clear = store.clear
        return cached

    return wrap
