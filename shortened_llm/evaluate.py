"""Perplexity as the paper measures it (official ``eval_ppl.py`` protocol).

Join the texts with "\\n\\n" (WikiText-2 raw test rows, PTB validation sentences), tokenize
once without special tokens, cut consecutive ``seq_len`` segments (the tail is dropped), and
report exp(mean NLL over every predicted token of every segment). Two BOS protocols:
``bos="once"`` puts one BOS before the whole text (their ppl.csv); ``bos="per-segment"``
puts BOS before every segment (their ppl_bos.csv; what Gemma needs).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import eval_cache
from .data import encoded_once, load_texts
from .families import family_of

__all__ = ["PPL_DATASETS", "perplexity", "ppl_segments", "token_nll", "default_bos", "ppl_key"]

PPL_DATASETS = ("wikitext2", "ptb")
BosProtocol = Literal["once", "per-segment"]


def default_bos(model) -> BosProtocol:
    """The family's default: per-segment BOS for families that break without it (Gemma)."""
    return "per-segment" if family_of(model).bos_every else "once"


@encoded_once(maxsize=8)
def _token_stream(tokenizer, dataset: str) -> torch.Tensor:
    text = "\n\n".join(load_texts(dataset))
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def ppl_segments(tokenizer, dataset: str = "wikitext2", seq_len: int = 128, bos: BosProtocol = "once",
                 max_segments: int | None = None) -> torch.Tensor:
    """``(n_segments, seq_len)`` ids, or ``(n, seq_len + 1)`` with ``bos="per-segment"``."""
    if dataset not in PPL_DATASETS:
        raise ValueError(f"Unknown perplexity dataset {dataset!r}. Available: {', '.join(PPL_DATASETS)}")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    if bos not in ("once", "per-segment"):
        raise ValueError(f"bos={bos!r} must be 'once' or 'per-segment'")
    if max_segments is not None and max_segments < 1:
        raise ValueError(f"max_segments={max_segments} must be >= 1 (or None for the whole set)")
    if tokenizer.bos_token_id is None:
        raise ValueError("the tokenizer has no BOS token; both PPL protocols need one")
    ids = _token_stream(tokenizer, dataset)
    bos_id = torch.tensor([tokenizer.bos_token_id])
    if bos == "once":
        ids = torch.cat([bos_id, ids])
    n = ids.numel() // seq_len
    if max_segments is not None:
        n = min(n, max_segments)
    segments = ids[: n * seq_len].view(n, seq_len)
    if bos == "per-segment":
        segments = torch.cat([bos_id.expand(n, 1), segments], dim=1)
    return segments


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def batch_starts(n: int, batch_size: int, progress: bool | str, desc: str):
    """The first row of each batch of ``batch_size`` among ``n``, under a progress bar when ``progress``
    is true (a string names the bar; ``desc`` otherwise)."""
    starts = range(0, n, batch_size)
    return tqdm(starts, desc=progress if isinstance(progress, str) else desc, unit="batch") if progress else starts


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, batch_size: int = 8, progress: bool | str = False) -> torch.Tensor:
    """NLL of every predicted token: ``(n, T)`` ids -> ``(n * (T - 1),)`` float32 losses."""
    device = _device_of(model)
    losses = []
    for i in batch_starts(len(input_ids), batch_size, progress, "perplexity"):
        batch = input_ids[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits  # (B, T, V)
        losses.append(shifted_nll(logits, batch).cpu())
    return torch.cat(losses)


def shifted_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of ids[:, 1:] under logits[:, :-1], in float32 whatever the model dtype."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")


def perplexity(model, tokenizer, dataset: str = "wikitext2", seq_len: int = 128, bos: BosProtocol | None = None,
               max_segments: int | None = None, batch_size: int = 8, progress: bool = True, cache=None) -> float:
    """Paper-protocol perplexity; ``bos=None`` follows the model family (see ``default_bos``).

    ``cache`` (``eval_cache.resolve``: ``None`` = the active cache, if any; ``False`` = none) reads
    the number back when this model's weights were measured on these very token ids at this batch
    size before, by any notebook: ``ppl_key`` says what the key holds.
    """
    bos = bos or default_bos(model)
    segments = ppl_segments(tokenizer, dataset, seq_len, bos, max_segments)

    def measure() -> float:
        nll = token_nll(model, segments, batch_size, progress=f"PPL {dataset}" if progress else False)
        return math.exp(nll.double().mean().item())

    store = eval_cache.resolve(cache)
    if store is None:
        return measure()
    key = ppl_key(model, segments, dataset=dataset, seq_len=seq_len, bos=bos, max_segments=max_segments,
                  batch_size=batch_size)
    return float(store.get_or_compute(key, measure))


def ppl_key(model, segments: torch.Tensor, **protocol) -> dict:
    """The evaluation-cache key of one PPL: the model (``eval_cache.model_key``), the digest of the
    token ids (dataset, tokenizer, seq_len, BOS rule and segment count all change them), and the
    protocol's settings spelled out so an entry reads on its own. The batch size is in it: batches
    of another shape may round the last digits differently."""
    return {"kind": "ppl", **eval_cache.model_key(model), "inputs": eval_cache.tensor_digest(segments), **protocol}
