"""Block importance criteria and the "+" rule (paper, Section 3.1).

Every criterion has one signature, ``fn(model, input_ids, **options) -> (num_blocks,)``
float64 tensor, higher = more important, and is registered by name. A "+" suffix
(``taylor+``, ``magnitude+``, ``ppl+``) does not change the scores: it protects the first
and last blocks when choosing what to remove (``blocks_to_remove(keep_first=4, keep_last=2)``).
"""
from __future__ import annotations

import difflib
import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from .evaluate import _shifted_nll
from .models import get_blocks
from .prune import skipping_blocks

__all__ = [
    "CRITERIA",
    "PLUS_RULE",
    "register_criterion",
    "split_criterion",
    "block_importance",
    "blocks_to_remove",
    "removal_order",
]

CRITERIA: dict[str, Callable[..., torch.Tensor]] = {}
PLUS_RULE = {"keep_first": 4, "keep_last": 2}  # the official "+" heuristic


def register_criterion(name: str):
    def wrap(fn):
        CRITERIA[name] = fn
        return fn

    return wrap


def split_criterion(criterion: str) -> tuple[str, bool]:
    """``"taylor+" -> ("taylor", True)``; unknown names get a did-you-mean error."""
    base, plus = (criterion[:-1], True) if criterion.endswith("+") else (criterion, False)
    if base not in CRITERIA:
        names = sorted(CRITERIA) + sorted(f"{c}+" for c in CRITERIA)
        close = difflib.get_close_matches(criterion, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown criterion {criterion!r}.{hint} Available: {', '.join(sorted(CRITERIA))} (each also with '+')")
    return base, plus


def _check_input(input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError("input_ids must be a non-empty (n_samples, seq_len) tensor of token ids (see calibration_batches)")
    if input_ids.shape[1] < 2:
        raise ValueError(f"calibration samples have {input_ids.shape[1]} token(s): need >= 2 to predict anything")
    return input_ids


def block_importance(model, input_ids: torch.Tensor, criterion: str = "ppl", **options) -> torch.Tensor:
    """One float per block of ``model``, higher = more important, by ``criterion``."""
    base, _ = split_criterion(criterion)
    return CRITERIA[base](model, _check_input(input_ids), **options)


def removal_order(scores: torch.Tensor) -> list[int]:
    """Blocks from least to most important (stable: ties keep block order)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    return sorted(range(len(scores)), key=lambda i: (scores[i].item(), i))


def blocks_to_remove(scores: torch.Tensor, n: int, keep_first: int = 0, keep_last: int = 0) -> list[int]:
    """The ``n`` least important blocks, never one of the first ``keep_first`` or last ``keep_last``."""
    total = len(scores)
    protected = set(range(min(keep_first, total))) | set(range(max(total - keep_last, 0), total))
    candidates = [i for i in removal_order(scores) if i not in protected]
    if n < 1:
        raise ValueError(f"n={n} must be >= 1 block to remove")
    if n > len(candidates):
        raise ValueError(
            f"n={n} blocks to remove but only {len(candidates)} of {total} are removable "
            f"with keep_first={keep_first}, keep_last={keep_last}"
        )
    return sorted(candidates[:n])


# ---- ppl: calibration perplexity with one block removed ------------------------------------

def _batches(input_ids: torch.Tensor, batch_size: int | None):
    batch_size = batch_size or len(input_ids)
    return [input_ids[i : i + batch_size] for i in range(0, len(input_ids), batch_size)]


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def _block_inputs(model, batch: torch.Tensor) -> list[torch.Tensor]:
    """The hidden state entering every block, from one forward pass of the full model."""
    blocks = get_blocks(model)
    inputs: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: inputs.append(_hidden_arg(a, k)), with_kwargs=True) for b in blocks]
    try:
        model(batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return inputs


@torch.no_grad()
def _nll_without(model, batch: torch.Tensor, block: int, inputs: list[torch.Tensor] | None) -> torch.Tensor:
    """Per-token NLL of ``batch`` with ``block`` removed.

    With ``inputs`` (the cached hidden state entering every block) the prefix is not
    recomputed: it is the same as in the full model. We keep only the blocks after
    ``block`` and hand the first of them the state that entered ``block``. The last block
    has no successor, so there block-1 runs once more from its own cached input.
    """
    n = len(get_blocks(model))
    device = _device(model)
    batch = batch.to(device)
    if inputs is None or block == 0:
        with skipping_blocks(model, [block]):
            return _shifted_nll(model(batch, use_cache=False).logits, batch)
    if block < n - 1:
        skip, injected = list(range(block + 1)), inputs[block]
    else:
        skip, injected = list(range(block - 1)) + [block], inputs[block - 1]
    with skipping_blocks(model, skip):
        first = get_blocks(model)[0]
        hook = first.register_forward_pre_hook(lambda m, a, k: _with_hidden(a, k, injected), with_kwargs=True)
        try:
            logits = model(batch, use_cache=False).logits
        finally:
            hook.remove()
    return _shifted_nll(logits, batch)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@register_criterion("ppl")
@torch.no_grad()
def ppl_importance(model, input_ids, batch_size: int | None = None, reuse_prefix: bool = True,
                   progress: bool = True) -> torch.Tensor:
    """Paper: calibration PPL with block i removed; a block whose loss hurts most is most important.

    ``reuse_prefix=True`` caches the hidden state entering each block once and runs only the
    suffix after a removal: about half the block passes of the naive sweep, same scores.
    """
    n = len(get_blocks(model))
    totals = torch.zeros(n, dtype=torch.float64)
    count = 0
    for batch in _batches(input_ids, batch_size):
        batch = batch.to(_device(model))
        cached = _block_inputs(model, batch) if reuse_prefix else None
        steps = tqdm(range(n), desc="ppl sweep", unit="block", disable=not progress, leave=False)
        for i in steps:
            totals[i] += _nll_without(model, batch, i, cached).double().sum().cpu()
        count += batch.shape[0] * (batch.shape[1] - 1)
        del cached
    return torch.tensor([math.exp(t / count) for t in totals.tolist()], dtype=torch.float64)


@register_criterion("magnitude")
@torch.no_grad()
def magnitude_importance(model, input_ids=None, **_) -> torch.Tensor:
    """Sum of |w| over every weight of the block: big weights, big role (no data needed)."""
    return torch.tensor([sum(p.detach().abs().double().sum().item() for p in b.parameters()) for b in get_blocks(model)],
                        dtype=torch.float64)
