"""One-shot depth pruning: remove whole Transformer blocks (paper, Section 3.2).

The pruned model is an ordinary Hugging Face model with fewer layers: the blocks are
really gone (no identity stand-ins), the survivors' KV-cache slots are renumbered, and the
config's per-layer lists follow the removal, so ``save_pretrained`` then
``from_pretrained`` needs no custom code.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Sequence

from torch import nn

from .families import family_of, get_blocks, get_path, set_blocks, unwrap
from .record import PruningRecord

__all__ = [
    "PruningRecord",
    "remove_blocks",
    "skipping_blocks",
    "num_blocks_for_ratio",
    "num_blocks_to_remove",
    "check_blocks",
    "block_indices",
]


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


def num_blocks_to_remove(total: int, ratio: float | None = None, n_blocks: int | None = None) -> int:
    """How many of ``total`` blocks go: exactly one of ``n_blocks`` (as given) or ``ratio`` (rounded).

    A count is what the official ``script/prune.sh`` passes: it removes 15 of Vicuna-13B's 40
    blocks and calls that 37 %, while ``round(0.35 * 40)`` is 14; a count says it exactly.
    """
    if (ratio is None) == (n_blocks is None):
        raise ValueError(f"ratio={ratio} and n_blocks={n_blocks}: give exactly one of the two "
                         f"(the share of the {total} blocks to remove, or how many blocks)")
    if ratio is not None:
        return num_blocks_for_ratio(total, ratio)
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or not 1 <= n_blocks < total:
        raise ValueError(f"n_blocks={n_blocks!r} must be a whole number in 1..{total - 1}: "
                         f"the blocks to remove of the model's {total} (at least one must stay)")
    return n_blocks


def block_indices(blocks: Iterable[int], n_blocks: int) -> list[int]:
    """Sorted unique block positions, each in range (whole blocks and halves alike)."""
    blocks = sorted({int(b) for b in blocks})
    bad = [b for b in blocks if not 0 <= b < n_blocks]
    if bad:
        raise IndexError(f"block indices {bad} out of range: the model has {n_blocks} blocks (0..{n_blocks - 1})")
    return blocks


def check_blocks(blocks: Iterable[int], n_blocks: int) -> list[int]:
    """Sorted unique block indices, each in range, not all of them."""
    blocks = block_indices(blocks, n_blocks)
    if len(blocks) >= n_blocks:
        raise ValueError(f"removing blocks {blocks} would leave none of the {n_blocks} blocks")
    return blocks


def _renumber(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Give each kept block its new KV-cache slot: cache layers are indexed by position.

    The family says which modules of a block hold ``layer_idx`` (the attention; Gemma-3's
    block too). A stale index would make a survivor read and write another block's cache.
    """
    family = family_of(model)
    for new_idx, block in enumerate(blocks):
        for path in family.index_paths:
            module = get_path(block, path) if path else block
            if not hasattr(module, "layer_idx"):
                raise AttributeError(
                    f"{type(module).__name__} at {path or '<block>'!r} has no layer_idx: "
                    f"FAMILIES[{model.config.model_type!r}] does not match this transformers version"
                )
            module.layer_idx = new_idx


def _period(layer_types: Sequence[str]) -> int | None:
    """k such that every k-th block (and only those) is global, as Gemma-3 writes its pattern."""
    n = len(layer_types)
    for k in range(1, n + 2):
        if list(layer_types) == ["sliding_attention" if (i + 1) % k else "full_attention" for i in range(n)]:
            return k
    return None


def _config_keys(config, family) -> list[str]:
    """Every config attribute a removal may change (see ``_subset_config``)."""
    keys = ["num_hidden_layers", *family.layer_lists, *family.first_k_counts, *family.layer_periods]
    return keys + ["_heterogeneity_spec"]  # transformers' per_layer_config (per-layer head counts, sizes)


def _config_snapshot(config, family) -> dict:
    return {k: copy.deepcopy(config.__dict__[k]) for k in _config_keys(config, family) if k in config.__dict__}


def _config_restore(config, family, snapshot: dict) -> None:
    for k in _config_keys(config, family):
        if k in snapshot:
            config.__dict__[k] = snapshot[k]
        else:
            config.__dict__.pop(k, None)


def _subset_config(config, keep: Sequence[int], n_before: int) -> None:
    """Make the config describe the kept blocks only, per the family's table entry.

    - ``num_hidden_layers`` = number of kept blocks;
    - per-block lists (``layer_types``) keep the kept blocks' entries, so a Gemma-2/3 block keeps
      its sliding or global attention and its cache layer type;
    - first-k counts (Qwen's ``max_window_layers``) count the kept blocks that were below k, so
      the list the config would rebuild from them is the same;
    - periods (Gemma-3's ``sliding_window_pattern``) stay only if still true, else are dropped;
    - a heterogeneous ``per_layer_config`` (transformers' per-layer overrides, e.g. head counts)
      moves each kept block's overrides to its new index.
    Only the listed attributes change: a list that merely has ``n_before`` entries (a Llama-3
    ``eos_token_id`` list in a 3-block model) is left alone.
    """
    family = family_of(config)
    for name in family.layer_lists:
        value = getattr(config, name, None)
        if value is None:
            continue
        if len(value) != n_before:
            raise ValueError(f"config.{name} has {len(value)} entries but the model has {n_before} blocks")
        setattr(config, name, type(value)(value[i] for i in keep))
    for name in family.first_k_counts:
        k = getattr(config, name, None)
        if k is not None:
            setattr(config, name, sum(1 for i in keep if i < k))
    layer_types = getattr(config, "layer_types", None)
    for name in family.layer_periods:
        if name in config.__dict__:
            period = _period(layer_types) if layer_types is not None else None
            if period is None:
                del config.__dict__[name]
            else:
                config.__dict__[name] = period
    spec = config.__dict__.get("_heterogeneity_spec")
    config.num_hidden_layers = len(keep)
    if spec is not None:
        config.per_layer_config = None
        moved = {new: copy.deepcopy(spec.per_layer_overrides[old])
                 for new, old in enumerate(keep) if old in spec.per_layer_overrides}
        if moved:
            config.per_layer_config = moved


def _apply(model: nn.Module, keep: Sequence[int]) -> None:
    inner = unwrap(model)
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
    return record.attach(model, criterion, ratio, scores)


@contextlib.contextmanager
def skipping_blocks(model: nn.Module, blocks: Iterable[int]):
    """Temporarily run ``model`` without ``blocks``; everything is restored on exit.

    No weights are copied, so a sweep over every single-block removal costs no memory.
    """
    inner = unwrap(model)
    old_blocks = get_blocks(inner)
    n = len(old_blocks)
    blocks = check_blocks(blocks, n)
    family = family_of(inner)
    saved = _config_snapshot(inner.config, family)
    keep = [i for i in range(n) if i not in set(blocks)]
    try:
        _apply(inner, keep)
        yield model
    finally:
        set_blocks(inner, old_blocks)
        _config_restore(inner.config, family, saved)
        _renumber(inner, old_blocks)
