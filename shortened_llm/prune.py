"""One-shot depth pruning: remove whole Transformer blocks (paper, Section 3.2).

The pruned model is an ordinary Hugging Face model with fewer layers: the blocks are
really gone (no identity stand-ins), the survivors' KV-cache slots are renumbered, and the
config's per-layer lists follow the removal, so ``save_pretrained`` then
``from_pretrained`` needs no custom code.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from torch import nn

from .models import _get_path, family_of, get_blocks, set_blocks, _unwrap

__all__ = [
    "PruningRecord",
    "remove_blocks",
    "skipping_blocks",
    "num_blocks_for_ratio",
    "check_blocks",
]


@dataclass
class PruningRecord:
    """What ``pruning.json`` holds: enough to map every kept block back to the original."""

    original_num_blocks: int
    removed_blocks: list[int] = field(default_factory=list)  # original indices, sorted
    criterion: str | None = None
    ratio: float | None = None
    scores: list[float] | None = None  # one per original block, higher = more important
    method: str = "depth"

    @property
    def kept_blocks(self) -> list[int]:
        removed = set(self.removed_blocks)
        return [i for i in range(self.original_num_blocks) if i not in removed]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "PruningRecord":
        data = json.loads(text)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def num_blocks_for_ratio(n_blocks: int, ratio: float) -> int:
    """``round(ratio * n_blocks)`` blocks to remove, checked to leave at least one block."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio={ratio} must be in (0, 1): it is the share of the {n_blocks} blocks to remove")
    n = round(ratio * n_blocks)
    if n < 1:
        raise ValueError(f"ratio={ratio} of {n_blocks} blocks rounds to 0 blocks: use a ratio >= {0.5 / n_blocks:.3f}")
    if n >= n_blocks:
        raise ValueError(f"ratio={ratio} would remove all {n_blocks} blocks")
    return n


def check_blocks(blocks: Iterable[int], n_blocks: int) -> list[int]:
    """Sorted unique block indices, each in range, not all of them."""
    blocks = sorted({int(b) for b in blocks})
    bad = [b for b in blocks if not 0 <= b < n_blocks]
    if bad:
        raise IndexError(f"block indices {bad} out of range: the model has {n_blocks} blocks (0..{n_blocks - 1})")
    if len(blocks) >= n_blocks:
        raise ValueError(f"removing blocks {blocks} would leave none of the {n_blocks} blocks")
    return blocks


def _renumber(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Give each kept block's attention its new KV-cache slot (cache layers are indexed by position)."""
    attn_path = family_of(model).attn
    for new_idx, block in enumerate(blocks):
        attn = _get_path(block, attn_path)
        if hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
        if hasattr(block, "layer_idx"):
            block.layer_idx = new_idx


def _subset_config(config, keep: Sequence[int], n_before: int) -> None:
    """Update ``num_hidden_layers`` and every per-layer list (``layer_types``, per-layer head counts)."""
    for name, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == n_before and name not in ("architectures",):
            setattr(config, name, type(value)(value[i] for i in keep))
    config.num_hidden_layers = len(keep)


def _apply(model: nn.Module, keep: Sequence[int]) -> None:
    inner = _unwrap(model)
    old = get_blocks(inner)
    kept = nn.ModuleList(old[i] for i in keep)
    _subset_config(inner.config, keep, len(old))
    set_blocks(inner, kept)
    _renumber(inner, kept)


def remove_blocks(model: nn.Module, blocks: Iterable[int], criterion: str | None = None,
                  ratio: float | None = None, scores=None) -> nn.Module:
    """Remove ``blocks`` (indices into the model's current blocks) in place and return the model.

    ``model.pruning`` records the removal in original-block indices, also across repeated
    calls, and ``save_model`` writes it as ``pruning.json``.
    """
    n_now = len(get_blocks(model))
    blocks = check_blocks(blocks, n_now)
    record = getattr(model, "pruning", None) or PruningRecord(original_num_blocks=n_now)
    current = record.kept_blocks  # original index of each current block
    keep = [i for i in range(n_now) if i not in set(blocks)]
    _apply(model, keep)
    record.removed_blocks = sorted(set(record.removed_blocks) | {current[i] for i in blocks})
    if criterion is not None:
        record.criterion = criterion
    if ratio is not None:
        record.ratio = ratio
    if scores is not None:
        record.scores = [float(s) for s in scores]
    model.pruning = record
    return model


@contextlib.contextmanager
def skipping_blocks(model: nn.Module, blocks: Iterable[int]):
    """Temporarily run ``model`` without ``blocks``; everything is restored on exit.

    No weights are copied, so a sweep over every single-block removal costs no memory.
    """
    inner = _unwrap(model)
    old_blocks = get_blocks(inner)
    n = len(old_blocks)
    blocks = check_blocks(blocks, n)
    saved_config = {k: v for k, v in vars(inner.config).items() if isinstance(v, (list, tuple)) and len(v) == n}
    saved_n = inner.config.num_hidden_layers
    keep = [i for i in range(n) if i not in set(blocks)]
    try:
        _apply(inner, keep)
        yield model
    finally:
        set_blocks(inner, old_blocks)
        _renumber(inner, old_blocks)
        for k, v in saved_config.items():
            setattr(inner.config, k, v)
        inner.config.num_hidden_layers = saved_n
