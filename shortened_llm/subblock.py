"""Sub-block pruning: remove the attention half or the MLP half of a block, not the whole block.

After BlockPruner (Zhong et al. 2024), FinerCut (Zhang et al. 2024) and "What Matters in
Transformers? Not All Attention is Needed" (He et al. 2024): a pre-norm block is two residual
sub-layers, ``h = h + attn(norm1(h))`` then ``h = h + mlp(norm2(h))``, and either can go alone.
Attention halves are cheap in parameters (4 d^2 of SmolLM2's ~13 d^2 per block) but they are
what fills the KV cache, so removing them is a memory and long-context speed play.

How a removed half is represented: its module (and its norm) is replaced by ``_Removed``,
which adds exactly zero to the residual stream (``h + 0 == h`` bit for bit), and has no weights.
The surviving attention modules are renumbered 0..A-1, so the KV cache, which is indexed by
attention layer, holds A layers of keys and values. (transformers 5.24 builds a
``DynamicCache(config)`` with one lazy layer per *block*, and ``config.layer_types`` must
have ``num_hidden_layers`` entries, so the cache object lists L layers; the L - A slots past the
last attention are never written and allocate nothing.)

Saving: the weights are an ordinary ``save_pretrained`` state dict, but a plain
``from_pretrained`` would rebuild every half and fill the removed ones with random weights. So a
saved directory is sealed: ``config.json`` gets ``model_type`` = ``SEALED_MODEL_TYPE`` (plain
transformers then refuses it with an "unrecognised model type" error that names
``shortened_llm``), the real type is kept under ``BASE_TYPE_KEY``, a README says how to load
it, and ``pruning.json`` records the removed halves. ``models.load_model`` calls
``load_subblock_model`` for such a directory and restores identical logits.

This module owns removing halves (the record, swap/restore, skipping, parameter counts, sealed
dirs and their loader) and registers the ``attn`` and ``mlp`` units with ``units``. Scoring halves
is ``importance.block_importance(..., unit="attn")``, the chain score -> choose -> remove is
``pipeline.prune_model``; the sub-layer names are ``families.FAMILIES[...].sublayers``.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Iterable

import torch
from torch import nn

from .families import FAMILIES, SubLayers, count_params, get_blocks, get_path, unwrap
from .models import register_dir_loader
from .prune import block_indices
from .record import PruningRecord
from .units import Unit, get_unit, register_unit

# Scoring, choosing and the notebook-09 comparison live with their concepts (importance, pipeline,
# lessons.unit_comparison); they reach the halves through ``units.UNITS``, never through this module.

__all__ = [
    "SUBLAYERS",
    "SubLayers",
    "SubBlockRecord",
    "SEALED_MODEL_TYPE",
    "SubLayerUnit",
    "removed_sublayers",
    "remove_sublayers",
    "skipping_sublayers",
    "unit_params",
    "is_subblock_dir",
    "load_subblock_model",
]

HALVES = ("attn", "mlp")
SEALED_MODEL_TYPE = "shortened_llm_subblock_pruned"  # what plain transformers sees and refuses
BASE_TYPE_KEY = "shortened_llm_base_model_type"  # the real model_type, restored by load_subblock_model


# The families whose blocks split into halves: a view of ``families.FAMILIES`` (its ``sublayers`` field)
SUBLAYERS = MappingProxyType({t: f.sublayers for t, f in FAMILIES.items() if f.sublayers is not None})


def _sublayers(model) -> SubLayers:
    model_type = getattr(unwrap(model).config, "model_type", None)
    if model_type not in SUBLAYERS:
        raise ValueError(
            f"model_type={model_type!r}: sub-block pruning (unit 'attn' or 'mlp') supports {', '.join(sorted(SUBLAYERS))}. "
            "Use unit='block' for this family, or give its entry in shortened_llm.families.FAMILIES sublayers= "
            "(families with per-layer attention types such as Gemma-2/Qwen2 need their layer_types handled too)."
        )
    return SUBLAYERS[model_type]


def _check_unit(unit: str) -> str:
    if unit not in HALVES:
        raise ValueError(f"unit={unit!r} must be one of {', '.join(HALVES)}")
    return unit


class _Removed(nn.Module):
    """Stands in for a removed half: adds exactly zero to the residual stream, holds no weights.

    ``layer_idx`` exists so that ``prune.remove_blocks`` can renumber a block holding one.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.layer_idx = None

    def forward(self, hidden_states, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.kind == "attn" else zeros

    def extra_repr(self) -> str:
        return f"removed {self.kind}"


# ---- the record -----------------------------------------------------------------------------

@dataclass
class SubBlockRecord(PruningRecord):
    """``pruning.json`` of a model with removed halves: original indices of the blocks that lost them."""

    removed_attn: list[int] = field(default_factory=list)
    removed_mlp: list[int] = field(default_factory=list)
    unit: str | None = None
    method: str = "subblock"

    def seal_dir(self, path: str | os.PathLike) -> None:
        """Mark a saved dir so plain ``from_pretrained`` refuses it instead of loading random halves."""
        path = Path(path)
        config_path = path / "config.json"
        raw = json.loads(config_path.read_text())
        if raw.get("model_type") != SEALED_MODEL_TYPE:
            raw[BASE_TYPE_KEY] = raw["model_type"]
            raw["model_type"] = SEALED_MODEL_TYPE
        config_path.write_text(json.dumps(raw, indent=2) + "\n")
        (path / "README.md").write_text(
            "# A sub-block-pruned model (shortened_llm)\n\n"
            f"Attention removed from original blocks {self.removed_attn}; MLP removed from {self.removed_mlp}.\n"
            "Plain `AutoModelForCausalLM.from_pretrained` cannot express a block without its attention or MLP "
            f"(it would rebuild them with random weights), so config.json says model_type={SEALED_MODEL_TYPE!r} "
            f"and transformers refuses it. Load it with:\n\n    from shortened_llm import load_model\n"
            "    model, tokenizer = load_model('<this dir>')\n"
        )


def _record(model) -> SubBlockRecord:
    old = getattr(model, "pruning", None)
    n = len(get_blocks(model))
    if isinstance(old, SubBlockRecord):
        return old
    if old is None:
        return SubBlockRecord(original_num_blocks=n)
    fields_ = {k: getattr(old, k) for k in PruningRecord.__dataclass_fields__ if k != "method"}
    return SubBlockRecord(**fields_)


# ---- removing halves --------------------------------------------------------------------------

def removed_sublayers(model, unit: str) -> list[int]:
    """Current block positions whose ``unit`` half is gone."""
    names = _sublayers(model)
    path = names.attn if _check_unit(unit) == "attn" else names.mlp
    return [i for i, b in enumerate(get_blocks(model)) if isinstance(get_path(b, path), _Removed)]


def _renumber_attention(model) -> None:
    """Live attentions get KV-cache slots 0..A-1 in order (the cache is indexed by attention layer)."""
    names = _sublayers(model)
    slot = 0
    for block in get_blocks(model):
        attn = get_path(block, names.attn)
        if not isinstance(attn, _Removed):
            attn.layer_idx = slot
            slot += 1


def _check_halves(model, unit: str, blocks: Iterable[int]) -> list[int]:
    n = len(get_blocks(model))
    blocks = block_indices(blocks, n)
    gone = set(removed_sublayers(model, unit))
    if gone & set(blocks):
        raise ValueError(f"the {unit} half of blocks {sorted(gone & set(blocks))} is already removed")
    if len(gone | set(blocks)) >= n:
        raise ValueError(
            f"removing the {unit} half of blocks {blocks} would leave no {unit} in any of the {n} blocks "
            f"({len(gone)} already removed): remove fewer (at most {n - 1 - len(gone)} more)")
    return blocks


def _swap(block, names: SubLayers, unit: str, replacement: dict | None = None) -> dict:
    """Replace the ``unit`` half (module and its norms) of ``block``; return what was there."""
    paths = (names.attn, *names.attn_norms) if unit == "attn" else (names.mlp, *names.mlp_norms)
    old = {}
    for p in paths:
        parent_path, _, name = p.rpartition(".")
        parent = get_path(block, parent_path) if parent_path else block
        old[p] = getattr(parent, name)
        new = replacement[p] if replacement else (_Removed(unit) if p in (names.attn, names.mlp) else nn.Identity())
        setattr(parent, name, new)
    return old


def remove_sublayers(model, unit: str, blocks: Iterable[int], criterion: str | None = None,
                     ratio: float | None = None, scores=None):
    """Remove the ``unit`` (``"attn"`` or ``"mlp"``) half of ``blocks`` (current positions) in place.

    Raises ValueError before changing anything when the removal would leave no attention or
    no MLP at all. ``model.pruning`` becomes a ``SubBlockRecord`` (original block indices).
    """
    names = _sublayers(model)
    blocks = _check_halves(model, _check_unit(unit), blocks)
    record = _record(model)
    original = record.kept_blocks
    inner = unwrap(model)
    for i in blocks:
        _swap(get_blocks(inner)[i], names, unit)
    _renumber_attention(inner)
    target = record.removed_attn if unit == "attn" else record.removed_mlp
    target[:] = sorted(set(target) | {original[i] for i in blocks})
    record.unit = unit if record.unit in (None, unit) else "mixed"
    return record.attach(model, criterion, ratio, scores)


@contextlib.contextmanager
def skipping_sublayers(model, unit: str, blocks: Iterable[int]):
    """Run ``model`` without the ``unit`` half of ``blocks`` for a while; everything is restored on exit."""
    names = _sublayers(model)
    blocks = _check_halves(model, _check_unit(unit), blocks)
    inner = unwrap(model)
    saved = {i: _swap(get_blocks(inner)[i], names, unit) for i in blocks}
    try:
        _renumber_attention(inner)
        yield model
    finally:
        for i, old in saved.items():
            _swap(get_blocks(inner)[i], names, unit, replacement=old)
        _renumber_attention(inner)


def _restore_halves(model, record: SubBlockRecord) -> None:
    """Apply a record's removed halves to a freshly loaded model (whose blocks are the kept ones)."""
    position = {orig: i for i, orig in enumerate(record.kept_blocks)}
    names = _sublayers(model)
    for unit, originals in (("attn", record.removed_attn), ("mlp", record.removed_mlp)):
        for orig in originals:
            _swap(get_blocks(model)[position[orig]], names, unit)
    _renumber_attention(model)


# ---- parameter accounting -------------------------------------------------------------------------

def _half_params(model, unit: str) -> int:
    """Parameters of the first live ``unit`` half of ``model`` (module and its norms)."""
    names = _sublayers(model)
    for block in get_blocks(model):
        paths = (names.attn, *names.attn_norms) if unit == "attn" else (names.mlp, *names.mlp_norms)
        mods = [get_path(block, p) for p in paths]
        if not isinstance(mods[0], _Removed):
            return sum(count_params(m) for m in mods)
    raise ValueError(f"no live {unit} half left")


def unit_params(model, unit: str) -> int:
    """Parameters one ``unit`` (block, attention half with its norm, MLP half with its norm) holds (first live one)."""
    return get_unit(unit).params(model)


class SubLayerUnit(Unit):
    """The attention or the MLP half of a block: a removed half stays in place as a zero update."""

    def __init__(self, kind: str):
        self.name, self.noun, self.plural = kind, f"{kind} half", f"{kind} halves"

    def check(self, model):
        _sublayers(model)

    def alive(self, model):
        gone = set(removed_sublayers(model, self.name))
        return [i for i in range(len(get_blocks(model))) if i not in gone]

    def skipping(self, model, indices):
        return skipping_sublayers(model, self.name, indices)

    def remove(self, model, indices, criterion=None, ratio=None, scores=None):
        return remove_sublayers(model, self.name, indices, criterion=criterion, ratio=ratio, scores=scores)

    def params(self, model):
        return _half_params(model, self.name)


for _kind in HALVES:
    register_unit(SubLayerUnit(_kind))


# ---- saved directories ----------------------------------------------------------------------------

def is_subblock_dir(path: str | os.PathLike) -> bool:
    """True for a model dir whose ``pruning.json`` records removed halves (sealed or not)."""
    record = Path(path) / "pruning.json"
    if not record.is_file():
        return False
    data = json.loads(record.read_text())
    return bool(data.get("removed_attn") or data.get("removed_mlp"))


def load_subblock_model(path: str | os.PathLike, dtype=None, device=None, device_map=None):
    """``(model, tokenizer)`` of a dir with removed halves: the weights, then the halves removed again."""
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    base_type = raw.pop(BASE_TYPE_KEY, None) or raw.get("model_type")
    raw.pop("model_type", None)
    for key in ("transformers_version", "architectures"):
        raw.pop(key, None)
    config = AutoConfig.for_model(base_type, **raw)
    record = SubBlockRecord.from_json((path / "pruning.json").read_text())
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # the removed halves' weights are missing on purpose
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, device_map=device_map)
    finally:
        hf_logging.set_verbosity(level)
    _restore_halves(model, record)
    if device_map is None:
        model.to(device)
    model.eval()
    model.pruning = record
    return model, AutoTokenizer.from_pretrained(path)


register_dir_loader(is_subblock_dir, load_subblock_model)  # load_model opens sub-block dirs

