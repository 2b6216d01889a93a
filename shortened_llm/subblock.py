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
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import unknown_name
from .models import get_path, unwrap, count_params, get_blocks, register_dir_loader
from .prune import PruningRecord

__all__ = [
    "relative_to",
    "UNITS",
    "SUBLAYERS",
    "SubLayers",
    "SubBlockRecord",
    "SUB_CRITERIA",
    "SEALED_MODEL_TYPE",
    "removed_sublayers",
    "remove_sublayers",
    "skipping_sublayers",
    "sublayer_importance",
    "sublayers_to_remove",
    "n_for_equal_params",
    "unit_params",
    "prune_unit",
    "kv_cache_bytes",
    "is_subblock_dir",
    "load_subblock_model",
    "equal_param_models",
    "speed_and_kv",
]

UNITS = ("block", "attn", "mlp")
SEALED_MODEL_TYPE = "shortened_llm_subblock_pruned"  # what plain transformers sees and refuses
BASE_TYPE_KEY = "shortened_llm_base_model_type"  # the real model_type, restored by load_subblock_model


@dataclass(frozen=True)
class SubLayers:
    """Where a pre-norm block keeps each half: the sub-layer module and the norm(s) feeding it only."""

    attn: str
    attn_norms: tuple[str, ...]
    mlp: str
    mlp_norms: tuple[str, ...]


_PRE_NORM = SubLayers("self_attn", ("input_layernorm",), "mlp", ("post_attention_layernorm",))
# Families whose block is exactly h += attn(norm1(h)); h += mlp(norm2(h)) and whose config has no
# per-layer attention types (renumbering attentions would misalign a per-layer sliding/global list).
SUBLAYERS: dict[str, SubLayers] = {"llama": _PRE_NORM, "mistral": _PRE_NORM, "phi3": _PRE_NORM}


def _sublayers(model) -> SubLayers:
    model_type = getattr(unwrap(model).config, "model_type", None)
    if model_type not in SUBLAYERS:
        raise ValueError(
            f"model_type={model_type!r}: sub-block pruning (unit 'attn' or 'mlp') supports {', '.join(sorted(SUBLAYERS))}. "
            "Use unit='block' for this family, or add its module names to shortened_llm.subblock.SUBLAYERS "
            "(families with per-layer attention types such as Gemma-2/Qwen2 need their layer_types handled too)."
        )
    return SUBLAYERS[model_type]


def _check_unit(unit: str, allow_block: bool = False) -> str:
    allowed = UNITS if allow_block else UNITS[1:]
    if unit not in allowed:
        raise ValueError(f"unit={unit!r} must be one of {', '.join(allowed)}")
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
    blocks = sorted({int(b) for b in blocks})
    bad = [b for b in blocks if not 0 <= b < n]
    if bad:
        raise IndexError(f"block indices {bad} out of range: the model has {n} blocks (0..{n - 1})")
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
    record.criterion = criterion if criterion is not None else record.criterion
    record.ratio = ratio if ratio is not None else record.ratio
    if scores is not None:
        record.scores = [float(s) for s in scores]
    model.pruning = record
    return model


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

def unit_params(model, unit: str) -> int:
    """Parameters one ``unit`` (block, attention half with its norm, MLP half with its norm) holds (first live one)."""
    names = _sublayers(model) if unit != "block" else None
    for block in get_blocks(model):
        if unit == "block":
            return count_params(block)
        paths = (names.attn, *names.attn_norms) if unit == "attn" else (names.mlp, *names.mlp_norms)
        mods = [get_path(block, p) for p in paths]
        if not isinstance(mods[0], _Removed):
            return sum(count_params(m) for m in mods)
    raise ValueError(f"no live {unit} half left")


def n_for_equal_params(model, unit: str, n_blocks: int) -> int:
    """How many ``unit`` halves hold about as many parameters as ``n_blocks`` whole blocks.

    Raises when that many halves do not exist (attention halves are small: 20 % of the blocks'
    parameters is ~80 % of SmolLM2's attentions, 35 % is more than all of them).
    """
    _check_unit(unit, allow_block=True)
    if unit == "block":
        return n_blocks
    n = round(n_blocks * unit_params(model, "block") / unit_params(model, unit))
    total = len(get_blocks(model))
    if n >= total:
        raise ValueError(f"{n_blocks} blocks hold the parameters of {n} {unit} halves, but the model has only "
                         f"{total} (one must stay): no {unit}-only pruning matches that parameter count")
    return max(n, 1)


# ---- scoring --------------------------------------------------------------------------------------

SUB_CRITERIA: dict[str, Callable[..., torch.Tensor]] = {}


def _register(name: str):
    def wrap(fn):
        SUB_CRITERIA[name] = fn
        return fn
    return wrap


def _nll(model, ids: torch.Tensor, batch_size: int | None) -> float:
    from .evaluate import shifted_nll

    device = next(model.parameters()).device
    total = 0.0
    step = batch_size or len(ids)
    for i in range(0, len(ids), step):
        batch = ids[i : i + step].to(device)
        total += shifted_nll(model(batch, use_cache=False).logits, batch).double().sum().item()
    return total / (ids.shape[0] * (ids.shape[1] - 1))


def _alive(model, unit: str) -> list[int]:
    gone = set(removed_sublayers(model, unit))
    return [i for i in range(len(get_blocks(model))) if i not in gone]


@_register("ppl")
@torch.no_grad()
def _ppl_scores(model, ids, unit: str, batch_size: int | None = None, progress: bool = True) -> torch.Tensor:
    """One-shot: calibration PPL with only this half removed (BlockPruner's measure)."""
    scores = torch.full((len(get_blocks(model)),), math.inf, dtype=torch.float64)
    for i in tqdm(_alive(model, unit), desc=f"ppl sweep ({unit})", unit="half", disable=not progress):
        with skipping_sublayers(model, unit, [i]):
            scores[i] = math.exp(_nll(model, ids, batch_size))
    return scores


@_register("sleb")
@torch.no_grad()
def _iterative_ppl(model, ids, unit: str, n: int | None = None, batch_size: int | None = None,
                   progress: bool = True) -> torch.Tensor:
    """Iterative (BlockPruner, FinerCut): remove the least harmful half, re-score the rest, ``n`` times.

    Like ``importance.sleb``: the score is the step at which a half went, the survivors get
    ``n + rank`` by their last-round PPL, so the ``k <= n`` lowest are the first ``k`` removals.
    """
    alive = _alive(model, unit)
    n = n if n is not None else max(1, round(0.2 * len(alive)))
    if not 1 <= n <= len(alive) - 1:
        raise ValueError(f"n={n} halves to remove greedily must be in 1..{len(alive) - 1}")
    removed: list[int] = []
    last = None
    for _ in tqdm(range(n), desc=f"iterative ppl ({unit})", unit="removal", disable=not progress):
        with skipping_sublayers(model, unit, removed):
            last = _ppl_scores(model, ids, unit, batch_size, progress=False)
        removed.append(int(torch.argmin(last)))
    scores = torch.full((len(get_blocks(model)),), math.inf, dtype=torch.float64)
    for step, b in enumerate(removed):
        scores[b] = step
    survivors = sorted((i for i in alive if i not in set(removed)), key=lambda i: (last[i].item(), i))
    for rank, b in enumerate(survivors):
        scores[b] = n + rank
    return scores


@_register("bi")
@torch.no_grad()
def _similarity(model, ids, unit: str, batch_size: int | None = None, progress: bool = True) -> torch.Tensor:
    """1 - cos(sub-layer input, sub-layer output) of the residual stream (ShortGPT's BI, per half)."""
    names = _sublayers(model)
    blocks = get_blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    step = batch_size or len(ids)
    device = next(model.parameters()).device
    for s in range(0, len(ids), step):
        states: dict[int, list] = {i: [] for i in range(len(blocks))}
        hooks = []
        for i, b in enumerate(blocks):
            hooks.append(b.register_forward_pre_hook(
                lambda m, a, k, i=i: states[i].append(a[0] if a else k["hidden_states"]), with_kwargs=True))
            hooks.append(get_path(b, names.attn).register_forward_hook(
                lambda m, a, out, i=i: states[i].append(out[0] if isinstance(out, tuple) else out)))
            hooks.append(b.register_forward_hook(
                lambda m, a, out, i=i: states[i].append(out[0] if isinstance(out, tuple) else out)))
        try:
            unwrap(model)(ids[s : s + step].to(device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        for i, (h_in, attn_out, h_out) in states.items():
            mid = h_in + attn_out
            a, b = (h_in, mid) if unit == "attn" else (mid, h_out)
            sums[i] += (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).double().sum().cpu()
    scores = sums / ids[:, :].numel()
    for i in removed_sublayers(model, unit):
        scores[i] = math.inf
    return scores


@_register("reverse")
def _reverse(model, ids, unit: str) -> torch.Tensor:
    """Deepest half first, no data."""
    scores = torch.arange(len(get_blocks(model)), 0, -1, dtype=torch.float64)
    scores[removed_sublayers(model, unit)] = math.inf
    return scores


@_register("random")
def _random(model, ids, unit: str, seed: int = 0) -> torch.Tensor:
    """A seeded random order, no data."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randperm(len(get_blocks(model)), generator=g).double()
    scores[removed_sublayers(model, unit)] = math.inf
    return scores


def sublayer_importance(model, input_ids: torch.Tensor | None, unit: str, criterion: str = "ppl",
                        **options) -> torch.Tensor:
    """One score per block for its ``unit`` half, higher = more important; removed halves get +inf.

    Criteria: ``ppl`` (one-shot), ``sleb`` (iterative greedy PPL; ``n`` halves), ``bi``
    (input/output similarity), ``reverse``, ``random``.
    """
    _check_unit(unit)
    _sublayers(model)
    if criterion not in SUB_CRITERIA:
        raise unknown_name("sub-block criterion", criterion, sorted(SUB_CRITERIA))
    if criterion not in ("reverse", "random") and (input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] < 2):
        raise ValueError(f"criterion {criterion!r} needs calibration input_ids of shape (n_samples, seq_len >= 2)")
    return SUB_CRITERIA[criterion](model, input_ids, unit, **options)


def sublayers_to_remove(scores: torch.Tensor, n: int, keep_first: int = 0, keep_last: int = 0) -> list[int]:
    """The ``n`` least important live halves (finite scores), sparing the first/last blocks if asked."""
    from .importance import blocks_to_remove

    finite = int(torch.isfinite(torch.as_tensor(scores)).sum())
    if n > finite - 1:
        raise ValueError(f"n={n} halves to remove but only {finite} are left and one must stay: remove at most {finite - 1}")
    chosen = blocks_to_remove(scores, n, keep_first=keep_first, keep_last=keep_last)
    if not all(math.isfinite(float(scores[i])) for i in chosen):
        raise ValueError(f"n={n} with keep_first={keep_first}, keep_last={keep_last} reaches already removed halves")
    return chosen


def prune_unit(model, input_ids, unit: str, n: int, criterion: str = "ppl", keep_first: int = 0,
               keep_last: int = 0, ratio: float | None = None, **options):
    """Score and remove ``n`` units in one call (``unit="block"`` uses the paper's block path)."""
    _check_unit(unit, allow_block=True)
    if unit == "block":
        from .importance import block_importance, blocks_to_remove, criterion_options
        from .prune import remove_blocks

        scores = block_importance(model, input_ids, criterion, **{**criterion_options(criterion, n), **options})
        removed = blocks_to_remove(scores, n, keep_first=keep_first, keep_last=keep_last)
        return remove_blocks(model, removed, criterion=criterion, ratio=ratio, scores=scores), removed
    n_alive = len(_alive(model, unit))
    if n >= n_alive:  # before any scoring work
        raise ValueError(f"n={n} {unit} halves to remove would leave no {unit} among the {n_alive} live ones: use at most {n_alive - 1}")
    if criterion == "sleb":
        options.setdefault("n", n)
    scores = sublayer_importance(model, input_ids, unit, criterion, **options)
    removed = sublayers_to_remove(scores, n, keep_first=keep_first, keep_last=keep_last)
    return remove_sublayers(model, unit, removed, criterion=criterion, ratio=ratio, scores=scores), removed


# ---- memory ---------------------------------------------------------------------------------------

@torch.no_grad()
def kv_cache_bytes(model, seq_len: int, batch_size: int = 1) -> int:
    """Bytes of keys and values the model's cache really holds after a ``seq_len``-token prefill (measured)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=unwrap(model).config)
    unwrap(model)(ids.to(device), cache=cache, use_cache=True, logits_to_keep=1)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


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


# ---- notebook 09: block vs attention-only vs MLP-only at equal parameter count ----------------

def equal_param_models(model_name: str, input_ids, n_blocks: int, criterion: str = "ppl",
                       units=UNITS) -> dict:
    """``{unit: (model, tokenizer, removed) or None}``: each unit pruned to ~``n_blocks`` blocks' parameters.

    ``None`` for a unit that cannot match that count (the error message is kept under ``"<unit>_why"``).
    The block path uses the block criterion of the same name (``sleb`` and ``bi`` exist for both).
    """
    from .models import load_model

    out: dict = {}
    for unit in units:
        model, tokenizer = load_model(model_name)
        try:
            n = n_for_equal_params(model, unit, n_blocks)
        except ValueError as err:
            out[unit], out[f"{unit}_why"] = None, str(err)
            continue
        crit = criterion if unit != "block" or criterion != "sleb" else "sleb"
        options = {"progress": False} if crit in ("ppl", "bi", "sleb") else {}
        model, removed = prune_unit(model, input_ids, unit, n, crit, **options)
        out[unit] = (model, tokenizer, removed)
    return out


def speed_and_kv(models: dict, contexts=(128, 2048), new_tokens: int = 16, repeats: int = 2, progress: bool = True):
    """Batch-1 generation latency after a ``context``-token prompt, and the measured KV-cache bytes, per model.

    Models are interleaved per context (a slow spell of a shared machine hits all alike).
    Uses ``efficiency.measure_generation`` (warm-up, then ``repeats`` timed forced-length runs).
    """
    import pandas as pd

    from .efficiency import measure_generation

    rows = []
    for ctx in tqdm(list(contexts), desc="contexts", disable=not progress):
        for name, model in models.items():
            r = measure_generation(model, batch_size=1, prompt_len=ctx, new_tokens=new_tokens, warmup=1,
                                   repeats=repeats, prefill=True)
            rows.append({"model": name, "context": ctx, "latency_s": r["latency_s"], "prefill_s": r["prefill_s"],
                         "decode_tokens_per_s": r["decode_tokens_per_s"], "kv_cache_mb": kv_cache_bytes(model, ctx) / 2**20,
                         "params": count_params(model)})
    return pd.DataFrame(rows)


def relative_to(speed, baseline: str = "dense"):
    """``speed_and_kv`` rows with ``speedup`` (baseline latency / latency) and ``kv_vs_dense``
    (KV cache / the baseline's) added, each against ``baseline`` at the same context."""
    base = speed[speed.model == baseline].set_index("context")
    return speed.assign(speedup=speed.context.map(base.latency_s) / speed.latency_s,
                        kv_vs_dense=speed.kv_cache_mb / speed.context.map(base.kv_cache_mb))


register_dir_loader(is_subblock_dir, load_subblock_model)  # load_model opens sub-block dirs
