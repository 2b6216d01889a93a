"""Block importance criteria and the "+" rule (paper, Section 3.1, and its peers).

Every criterion has one signature, ``fn(model, input_ids, **options) -> (num_blocks,)``
float64 tensor, higher = more important, and is registered by name (``block_importance`` runs
each in fp32 whatever the model's dtype: bf16 moves near-ties, and near-ties decide the cut):

- ``ppl`` (paper): calibration PPL with block i removed.
- ``taylor`` (paper, after LLM-Pruner): sum over the block's weights of |w * dL/dw|.
- ``magnitude`` (paper baseline): sum of |w| over the block's weights.
- ``bi`` (ShortGPT, Men et al. 2024): Block Influence, 1 - cos(h_in, h_out).
- ``angular`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"):
  angular distance between the input of block i and of block i + n.
- ``sleb`` (Song et al. 2024): greedy removal, re-scoring the survivors after each removal.
- ``reverse`` and ``random``: data-free baselines (deepest first; seeded shuffle).

Criteria score any pruning unit they declare (``units.UNITS``: ``block``, and the ``attn`` /
``mlp`` halves of sub-block pruning): ``block_importance(model, ids, "ppl", unit="attn")``
gives one score per block for its attention half, +inf where that half is already gone, so
``to_remove`` never picks it. ``ppl``, ``sleb``, ``bi``, ``reverse`` and ``random`` score every
unit; ``taylor``, ``magnitude`` and ``angular`` whole blocks only.

A "+" suffix (``taylor+``, ``magnitude+``, ``ppl+``) does not change the scores: it protects
the first and last blocks when choosing what to remove (``to_remove(keep_first=4,
keep_last=2)``, the official code's heuristic, here a visible parameter whose values are the
preset's ``keep_first`` / ``keep_last``: ``pipeline.plus_rule``).
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import eval_cache
from .artifacts import fault_point
from .errors import unknown_name
from .evaluate import shifted_nll
from .families import family_of, get_blocks, get_path, hooks_removed, unwrap
from .finite import check_finite_scores
from .precision import cast_dtypes, floating_dtypes
from .presets import Preset
from .prune import num_blocks_for_ratio
from .units import get_unit

__all__ = [
    "CRITERIA",
    "CRITERION_UNITS",
    "DATA_FREE",
    "PLUS_RULE",
    "register_criterion",
    "criteria_for",
    "split_criterion",
    "check_criterion",
    "criterion_options",
    "block_importance",
    "scores_key",
    "sublayer_importance",
    "check_removable",
    "to_remove",
    "blocks_to_remove",
    "sublayers_to_remove",
    "removal_order",
]

CRITERIA: dict[str, Callable[..., torch.Tensor]] = {}
DATA_FREE: set[str] = set()  # criteria that ignore the calibration set (input_ids may be None)
CRITERION_UNITS: dict[str, tuple[str, ...]] = {}  # the pruning units each criterion can score
# The official "+" heuristic at the preset's defaults (``Preset.keep_first`` / ``keep_last``): one
# source for the numbers; ``pipeline.plus_rule(criterion, preset)`` reads a given preset's.
PLUS_RULE = {"keep_first": Preset.keep_first, "keep_last": Preset.keep_last}


def register_criterion(name: str, needs_data: bool = True, units: tuple[str, ...] = ("block",)):
    """Register ``fn(model, input_ids, **options)`` as criterion ``name``, scoring the given ``units``.

    A criterion of more than whole blocks takes ``unit=`` and gives +inf to units already removed.
    """
    def wrap(fn):
        CRITERIA[name] = fn
        CRITERION_UNITS[name] = tuple(units)
        if not needs_data:
            DATA_FREE.add(name)
        return fn

    return wrap


def criteria_for(unit: str) -> list[str]:
    """The criteria that can score ``unit``, sorted."""
    return sorted(c for c, units in CRITERION_UNITS.items() if unit in units)


def split_criterion(criterion: str) -> tuple[str, bool]:
    """``"taylor+" -> ("taylor", True)``; unknown names get a did-you-mean error."""
    if not isinstance(criterion, str):
        raise TypeError(f"criterion={criterion!r} must be a string such as 'ppl' or 'taylor+'")
    base, plus = (criterion[:-1], True) if criterion.endswith("+") else (criterion, False)
    if base not in CRITERIA:
        names = sorted(CRITERIA) + sorted(f"{c}+" for c in CRITERIA)
        raise unknown_name("criterion", criterion, names, available=", ".join(sorted(CRITERIA)), note=" (each also with '+')")
    return base, plus


def check_criterion(criterion: str, unit: str = "block") -> str:
    """The base name of ``criterion`` (``"ppl+" -> "ppl"``) if it scores ``unit``; else one clear error.

    Needs no model: the CLI calls it before loading anything.
    """
    get_unit(unit)
    base, _ = split_criterion(criterion)
    if unit not in CRITERION_UNITS[base]:
        raise ValueError(f"criterion {criterion!r} does not score unit {unit!r}: the criteria for {unit!r} are "
                         f"{', '.join(criteria_for(unit))} (each also with '+')")
    return base


def criterion_options(criterion: str, n: int | None) -> dict:
    """``{"n": n}`` for criteria whose scores depend on how many blocks go (``sleb``, ``angular``).

    The CLI and notebooks pass the number of blocks to remove through this, so a criterion
    that needs it gets it and the others are not bothered (no per-name special case).
    """
    base, _ = split_criterion(criterion)
    takes_n = "n" in inspect.signature(CRITERIA[base]).parameters
    return {"n": n} if takes_n and n is not None else {}


def _check_input(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids={shape} must be a non-empty (n_samples, seq_len) tensor of token ids (see calibration_batches)")
    if input_ids.shape[1] < 2:
        raise ValueError(f"calibration samples have {input_ids.shape[1]} token(s): need >= 2 to predict anything; "
                         "use a larger seq_len in calibration_batches")
    return input_ids


def block_importance(model, input_ids: torch.Tensor | None, criterion: str = "ppl", fp32: bool = True,
                     unit: str = "block", cache=None, **options) -> torch.Tensor:
    """One float per block of ``model``, higher = more important, by ``criterion``, for ``unit``.

    ``unit="block"`` scores whole blocks (the paper); ``"attn"`` / ``"mlp"`` score each block's
    half, with +inf for halves already removed. A criterion that does not score ``unit`` is
    refused before any work. Data-free criteria (``magnitude``, ``reverse``, ``random``) accept
    ``input_ids=None``. ``fp32=True`` scores in fp32 whatever the model's dtype (``_in_fp32``,
    Taylor's own switch, for every criterion that runs the model): the scores are those of the
    fp32 model with the same weights. In bf16 the ``ppl`` scores of the embedded model move by up
    to 11 % and the six blocks removed change (FINDINGS, "bf16 on this CPU"). ``fp32=False``: the
    model's own dtype.

    ``cache`` (``eval_cache.resolve``: ``None`` = the active cache, if any; ``False`` = none) gives the
    scores back when these weights were scored on these token ids with these options before
    (``scores_key``): notebooks 09 and 10 score the same dense model on the same calibration
    batches, and 09 scores its blocks twice (its pruned models, then the equal-parameter units).
    Data-free criteria take no cache: they cost less than the weights' digest.
    """
    base = check_criterion(criterion, unit)
    get_unit(unit).check(model)
    accepted = inspect.signature(CRITERIA[base]).parameters
    if "unit" in accepted:
        options["unit"] = unit
    if "fp32" in accepted:
        options["fp32"] = fp32  # taylor: the same switch, applied inside (and a no-op once fp32)
    if "progress" not in accepted:
        options.pop("progress", None)  # an instant criterion (no loop): nothing to show, same call for all
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = sorted(set(accepted) - {"model", "input_ids", "unit"})
        raise ValueError(f"criterion {base!r} takes no option(s) {unknown}; it takes: {', '.join(takes) or 'none'}")
    if base not in DATA_FREE or input_ids is not None:
        input_ids = _check_input(input_ids)

    def compute() -> torch.Tensor:
        with _in_fp32(model, fp32 and base not in DATA_FREE):  # data-free ones sum |w| in float64 already
            scores = CRITERIA[base](model, input_ids, **options)
        assert scores.shape == (len(get_blocks(model)),), (base, scores.shape)
        fault_point("compute")  # a test hook (artifacts.FAULT_ENV): killed with the scores computed, nothing written
        return scores

    store = None if base in DATA_FREE else eval_cache.resolve(cache)
    if store is None:
        scores = compute()
    else:  # float64 through JSON's repr is exact, inf included
        key = scores_key(model, input_ids, options, criterion=base, unit=unit, fp32=fp32)
        scores = torch.tensor(store.get_or_compute(key, lambda: compute().double().tolist()), dtype=torch.float64)
    return check_finite_scores(scores, criterion, get_unit(unit).alive(model))


def scores_key(model, input_ids: torch.Tensor, options: dict, **protocol) -> dict:
    """The evaluation-cache key of one criterion's scores: the model (``eval_cache.model_key``), the
    digest of the calibration token ids, the criterion, unit and options spelled out (``progress``
    left out: it changes what is shown, not what is computed). Torch's thread count is left out too,
    as from every key of the cache: Taylor's gradients sum in another order on 2 threads than on 1
    (the embedded model's scores move by 3e-16), and a notebook pruning on one core after notebook 01
    scored on two must remove the blocks 01 showed, not score them again to the last bit."""
    return {"kind": "scores", **eval_cache.model_key(model), "inputs": eval_cache.tensor_digest(input_ids), **protocol,
            "options": {k: v for k, v in options.items() if k != "progress"}}


def sublayer_importance(model, input_ids: torch.Tensor | None, unit: str, criterion: str = "ppl",
                        **options) -> torch.Tensor:
    """Compatibility name (notebook 09, old code): ``block_importance`` with the old argument order."""
    return block_importance(model, input_ids, criterion, unit=unit, **options)


def removal_order(scores: torch.Tensor) -> list[int]:
    """Blocks from least to most important (stable: ties keep block order)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    return sorted(range(len(scores)), key=lambda i: (scores[i].item(), i))


def check_removable(total: int, n: int, keep_first: int = 0, keep_last: int = 0) -> int:
    """Raise unless ``n`` of ``total`` blocks can go while the protected ones stay; returns how many could.

    Called before any scoring work (CLI, notebooks, ``pipeline.prune_model``) as well as by ``to_remove``.
    """
    if keep_first < 0 or keep_last < 0:
        raise ValueError(f"keep_first={keep_first} and keep_last={keep_last} must be >= 0")
    removable = len(set(range(total)) - set(range(min(keep_first, total))) - set(range(max(total - keep_last, 0), total)))
    if n < 1:
        raise ValueError(f"n={n} must be >= 1 block to remove")
    if n > removable:
        raise ValueError(
            f"n={n} blocks to remove but only {removable} of {total} are removable "
            f"with keep_first={keep_first}, keep_last={keep_last}: lower the ratio or drop the '+' rule"
        )
    return removable


def to_remove(scores: torch.Tensor, n: int, keep_first: int = 0, keep_last: int = 0) -> list[int]:
    """The ``n`` least important units, never one of the first ``keep_first`` or last ``keep_last``.

    Units already removed carry +inf and are never chosen: at most all live ones but one go.
    """
    total = len(scores)
    check_removable(total, n, keep_first, keep_last)
    finite = [math.isfinite(float(s)) for s in scores]
    if n > sum(finite) - 1:
        raise ValueError(f"n={n} units to remove but only {sum(finite)} are left and one must stay: "
                         f"remove at most {sum(finite) - 1}")
    protected = set(range(min(keep_first, total))) | set(range(max(total - keep_last, 0), total))
    candidates = [i for i in removal_order(scores) if i not in protected and finite[i]]
    if len(candidates) < n:
        raise ValueError(f"n={n} with keep_first={keep_first}, keep_last={keep_last} reaches already removed units: "
                         f"only {len(candidates)} live ones are removable")
    return sorted(candidates[:n])


# The names each unit's code called it by (the README, notebooks 01-09 and the benchmarks use them)
blocks_to_remove = to_remove
sublayers_to_remove = to_remove


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


def _device(model) -> torch.device:
    """Where the ids go: the input embeddings' device (the first shard under ``device_map="auto"``)."""
    emb = unwrap(model).get_input_embeddings()
    return emb.weight.device if emb is not None else next(model.parameters()).device


@torch.no_grad()
def _block_states(model, batch: torch.Tensor, attn_path: str | None = None):
    """The hidden state entering every block, plus the last block's output: ``L + 1`` tensors.

    One pass of the base model (no LM head: nothing here needs logits). Each tensor is
    (B, T, d) on the device of the block that produced or received it. With ``attn_path`` (a
    family's ``SubLayers.attn``) also each block's attention output, ``(states, attn_outputs)``:
    ``states[i] + attn_outputs[i]`` is the residual stream between block i's two halves.
    """
    blocks = get_blocks(model)
    states: list[torch.Tensor] = []
    attn_outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: states.append(_hidden_arg(a, k)), with_kwargs=True)
             for b in blocks]
    hooks.append(blocks[-1].register_forward_hook(lambda m, a, out: states.append(_first(out))))
    if attn_path is not None:
        hooks += [get_path(b, attn_path).register_forward_hook(lambda m, a, out: attn_outputs.append(_first(out)))
                  for b in blocks]
    with hooks_removed(hooks):
        unwrap(model).base_model(batch.to(_device(model)), use_cache=False)
    return states if attn_path is None else (states, attn_outputs)


def _first(out):
    """A module's hidden-state output (blocks and attentions return tuples in some families)."""
    return out[0] if isinstance(out, tuple) else out


def _block_inputs(model, batch: torch.Tensor) -> list[torch.Tensor]:
    return _block_states(model, batch)[:-1]


@contextlib.contextmanager
def _inject(block, hidden: torch.Tensor):
    """Make ``block`` ignore the hidden state it is given and start from ``hidden`` instead."""
    hook = block.register_forward_pre_hook(lambda m, a, k: _with_hidden(a, k, hidden), with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


@torch.no_grad()
def _nll_without(model, batch: torch.Tensor, block: int, inputs: list[torch.Tensor] | None,
                 unit: str = "block") -> torch.Tensor:
    """Per-token NLL of ``batch`` with ``unit`` ``block`` removed.

    Without ``inputs`` this is the naive way: one forward pass of the model minus that unit
    (the only way for a half: its block still runs). With ``inputs`` (the cached hidden state
    entering every block) a whole block's prefix is not recomputed, since it is the same as in
    the full model: only the blocks after ``block`` run, and the first of them starts from the
    state that entered ``block``. The last block has no successor, so there the block before it
    runs once more from its cached input.
    """
    n = len(get_blocks(model))
    batch = batch.to(_device(model))
    if inputs is None:
        with get_unit(unit).skipping(model, [block]):
            return shifted_nll(model(batch, use_cache=False).logits, batch)
    if block < n - 1:
        skip, injected = list(range(block + 1)), inputs[block]
    else:
        skip, injected = list(range(block - 1)) + [block], inputs[block - 1]
    with get_unit("block").skipping(model, skip), _inject(get_blocks(model)[0], injected):
        logits = model(batch, use_cache=False).logits
    return shifted_nll(logits, batch)


def _check_blocks_for(criterion: str, model, minimum: int = 2) -> int:
    n = len(get_blocks(model))
    if n < minimum:
        raise ValueError(f"criterion {criterion!r} needs a model with >= {minimum} blocks, this one has {n}")
    return n


def _gone_infinite(scores: torch.Tensor, model, unit: str) -> torch.Tensor:
    """``scores`` with +inf for every unit already removed, so that ``to_remove`` never picks one."""
    alive = set(get_unit(unit).alive(model))
    scores[[i for i in range(len(scores)) if i not in alive]] = math.inf
    return scores


@register_criterion("ppl", units=("block", "attn", "mlp"))
@torch.no_grad()
def ppl_importance(model, input_ids, batch_size: int | None = None, reuse_prefix: bool = True,
                   progress: bool = True, unit: str = "block") -> torch.Tensor:
    """Paper: calibration PPL with block i removed; the block whose loss hurts most is most important.

    ``reuse_prefix=True`` caches the hidden state entering each block once and runs only the
    suffix after a removal: about half the block passes of the naive sweep
    (``reuse_prefix=False``), same scores. The final norm and LM head still run once per
    removal, which bounds the gain (about 1.6x for a 30-block model with a 49k vocabulary).
    For a half (``unit="attn"`` / ``"mlp"``, BlockPruner's measure) its block still runs, so
    the sweep is the naive one.
    """
    n = _check_blocks_for("ppl", model)
    alive = get_unit(unit).alive(model)
    totals = torch.zeros(n, dtype=torch.float64)
    count = 0
    for batch in _batches(input_ids, batch_size):
        cached = _block_inputs(model, batch) if reuse_prefix and unit == "block" else None
        steps = tqdm(alive, desc=f"ppl sweep ({unit})", unit=unit, disable=not progress)
        for i in steps:
            totals[i] += _nll_without(model, batch, i, cached, unit).double().sum().cpu()
        count += batch.shape[0] * (batch.shape[1] - 1)
        del cached
    scores = torch.tensor([math.exp(t / count) for t in totals.tolist()], dtype=torch.float64)
    return _gone_infinite(scores, model, unit)


# ---- weight-based: magnitude and taylor -----------------------------------------------------

def _block_weights(block) -> list[torch.nn.Parameter]:
    """The block's weight tensors (biases excluded, as in the official code)."""
    return [p for name, p in block.named_parameters() if name.endswith("weight")]


@register_criterion("magnitude", needs_data=False)
@torch.no_grad()
def magnitude_importance(model, input_ids=None) -> torch.Tensor:
    """Sum of |w| over the block's weights: big weights, big role (no data needed)."""
    return torch.tensor([sum(p.detach().abs().double().sum().item() for p in _block_weights(b))
                         for b in get_blocks(model)], dtype=torch.float64)


@contextlib.contextmanager
def _only_blocks_trainable(model):
    """Gradients for the block weights only; embeddings, final norm and head stay frozen.

    That is one gradient buffer per block weight and none for the (large) embeddings.
    Everything is restored on exit, including ``.grad`` (set back to None).
    """
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    wanted = {id(p) for b in get_blocks(model) for p in _block_weights(b)}
    try:
        for p in params:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        yield [p for p in params if id(p) in wanted]
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
            p.grad = None


@contextlib.contextmanager
def _checkpointed(blocks, enabled: bool):
    """Recompute each block's activations in backward instead of storing them (big models).

    Our own ``torch.utils.checkpoint`` wrapper, so it works in eval mode (no dropout) and on
    any family; the transformers switch needs ``model.train()``.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    originals = [b.forward for b in blocks]
    own = [b.__dict__.get("forward") for b in blocks]  # accelerate's device hooks live here
    try:
        for b, fwd in zip(blocks, originals):
            b.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)
        yield
    finally:
        for b, fwd in zip(blocks, own):
            if fwd is None:
                del b.forward  # back to the class method
            else:
                b.forward = fwd


@contextlib.contextmanager
def _in_fp32(model, enabled: bool = True):
    """Run ``model`` in fp32 while inside: every floating parameter and buffer, back on exit.

    Parameters are cast in place (``.data`` swapped: same objects, tied weights stay tied), so
    the model costs 4 bytes per parameter while inside, not 6; every fp16 and bf16 value is
    exact in fp32, so casting back (``precision.cast_dtypes``) restores the weights bit for
    bit, buffers (RoPE's ``inv_freq``) too. An fp32 model is untouched.
    """
    if not enabled:
        yield
        return
    dtypes = floating_dtypes(model)
    try:
        cast_dtypes(model, dict.fromkeys(dtypes, torch.float32))
        yield
    finally:
        cast_dtypes(model, dtypes)


@register_criterion("taylor")
def taylor_importance(model, input_ids, batch_size: int | None = None, gradient_checkpointing: bool = False,
                      fp32: bool = True, progress: bool = True) -> torch.Tensor:
    """Paper (after LLM-Pruner): per block, sum over its weights of |w * dL/dw|.

    ``L`` is the mean NLL over the whole calibration set: each batch's summed NLL is divided
    by the total token count and gradients accumulate in ``.grad`` over batches, so there is
    one gradient per weight whatever the number of batches (the official code sums w * grad
    per batch and takes |.| at the end, which is the same thing when all fits in one batch).

    ``fp32=True`` computes in fp32 whatever the model's dtype, as the official scripts did (on
    CPU): fp16 gradients without loss scaling lose digits, and where two blocks nearly tie at
    the cut those digits decide which one goes. The scores are then those of the fp32 model
    with the same weights. It needs 4 bytes per parameter while it runs;
    ``fp32=False`` scores in the model's own dtype (half the memory). Each weight's term is taken
    as soon as its last gradient lands and the gradient is freed, so one batch (the default)
    never holds every block's gradients at once.
    """
    n = _check_blocks_for("taylor", model, minimum=1)
    blocks = get_blocks(model)
    total_tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
    batches = _batches(input_ids, batch_size)
    terms: dict[int, float] = {}  # id(weight) -> sum |w * dL/dw|, filled in the last backward
    final = [False]  # set for the last batch, whose backward completes every gradient

    def take_term(p):
        if final[0]:
            terms[id(p)] = (p.detach() * p.grad).abs().double().sum().item()
            p.grad = None

    with _in_fp32(model, fp32), _only_blocks_trainable(model) as weights, \
            _checkpointed(blocks, gradient_checkpointing), torch.enable_grad():
        with hooks_removed([p.register_post_accumulate_grad_hook(take_term) for p in weights]):
            for k, batch in enumerate(tqdm(batches, desc="taylor gradients", unit="batch", disable=not progress)):
                final[0] = k == len(batches) - 1
                batch = batch.to(_device(model))
                logits = model(batch, use_cache=False).logits  # (B, T, V)
                loss = shifted_nll(logits, batch.to(logits.device)).sum() / total_tokens
                del logits
                loss.backward()
    scores = torch.zeros(n, dtype=torch.float64)
    for i, b in enumerate(blocks):
        scores[i] = sum(terms[id(p)] for p in _block_weights(b) if id(p) in terms)
    return scores


# ---- representation similarity: bi and angular ----------------------------------------------

def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine per token, (B, T, d) x (B, T, d) -> (B, T), in float32 on ``a``'s device."""
    return F.cosine_similarity(a.float(), b.to(a.device).float(), dim=-1)


@register_criterion("bi", units=("block", "attn", "mlp"))
@torch.no_grad()
def block_influence(model, input_ids, batch_size: int | None = None, progress: bool = True,
                    unit: str = "block") -> torch.Tensor:
    """ShortGPT: 1 - mean cosine(h_in, h_out) over tokens; a block that barely turns h is redundant.

    For a half, h_in and h_out are the residual stream before and after that half alone
    (``h + attn(norm1(h))`` lies between them): ShortGPT's measure per sub-layer.
    """
    n = _check_blocks_for("bi", model, minimum=1)
    attn_path = None if unit == "block" else family_of(model).sublayers.attn
    sums, count = torch.zeros(n, dtype=torch.float64), 0
    for batch in tqdm(_batches(input_ids, batch_size), desc="block influence", unit="batch", disable=not progress):
        states = _block_states(model, batch, attn_path)
        if attn_path is not None:
            states, attn_outputs = states
        for i in range(n):
            h_in, h_out = states[i], states[i + 1]
            if unit != "block":
                middle = h_in + attn_outputs[i]  # after the attention half, before the MLP half
                h_in, h_out = (h_in, middle) if unit == "attn" else (middle, h_out)
            sums[i] += (1 - _cosine(h_in, h_out)).double().sum().cpu()
        count += batch.numel()
        del states
    return _gone_infinite(sums / count, model, unit)


@register_criterion("angular")
@torch.no_grad()
def angular_distance(model, input_ids, n: int = 1, last_token: bool = False, batch_size: int | None = None,
                     progress: bool = True) -> torch.Tensor:
    """Gromov et al.: arccos(cos(x_s, x_{s+n})) / pi, the angle the span of ``n`` blocks from s turns.

    ``x_s`` is the input of block s (``x_L`` the last block's output); only spans that fit
    (s + n <= L) count. Gromov et al. drop the span with the smallest angle. So that the usual
    ranking does the same, each block gets the smallest angle of any span that contains it:
    the ``n`` lowest-scored blocks are then exactly that span (ties go to the lower index),
    and the span starts at the argmin. ``last_token=True`` uses the last token only (their
    choice); the default averages all tokens, steadier on a 10-sample calibration set.
    """
    n_blocks = _check_blocks_for("angular", model, minimum=1)
    if not 1 <= n <= n_blocks:
        raise ValueError(f"n={n} is the span length in blocks: it must be in 1..{n_blocks} for this model")
    n_spans = n_blocks - n + 1
    sums, count = torch.zeros(n_spans, dtype=torch.float64), 0
    for batch in tqdm(_batches(input_ids, batch_size), desc="angular distance", unit="batch", disable=not progress):
        states = _block_states(model, batch)
        if last_token:
            states = [s[:, -1:] for s in states]
        for s in range(n_spans):
            cos = _cosine(states[s], states[s + n]).clamp(-1, 1)
            sums[s] += (torch.arccos(cos) / math.pi).double().sum().cpu()
        count += states[0].shape[0] * states[0].shape[1]
        del states
    span = sums / count  # span[s]: the angle across blocks s .. s+n-1
    return torch.stack([span[max(0, j - n + 1): min(j, n_spans - 1) + 1].min() for j in range(n_blocks)])


# ---- iterative: sleb --------------------------------------------------------------------------

def greedy_scores(model, unit: str, n: int, score_alive: Callable[[], torch.Tensor], desc: str = "greedy",
                  progress: bool = True) -> torch.Tensor:
    """Greedy removal as scores: remove the lowest-scored unit, re-score the rest, ``n`` times.

    ``score_alive()`` scores the model as it runs at that moment (the units removed so far are
    skipped). Greedy removal is an order, not a static score, so the score is the step at
    which a unit went (0 = first); the units still there get ``n + rank`` by their last-round
    score, and units removed before the call +inf. Hence ``to_remove(scores, k)`` for any
    ``k <= n`` is exactly the first ``k`` greedy removals.
    """
    units = get_unit(unit)
    total, alive = len(get_blocks(model)), units.alive(model)
    removed: list[int] = []
    last: dict[int, float] = {}
    for _step in tqdm(range(n), desc=desc, unit="removal", disable=not progress):
        candidates = [i for i in alive if i not in set(removed)]
        with units.skipping(model, removed):
            now = score_alive()
        # a skipped block is gone from the list, so the k-th score is the k-th candidate's; a half stays in place
        values = now if units.skip_shifts_positions else now[candidates]
        removed.append(candidates[int(torch.argmin(values))])
        last = dict(zip(candidates, values.tolist()))
    scores = torch.full((total,), math.inf, dtype=torch.float64)
    for step, b in enumerate(removed):
        scores[b] = step
    survivors = sorted((i for i in alive if i not in set(removed)), key=lambda i: (last[i], i))
    for rank, b in enumerate(survivors):
        scores[b] = n + rank
    return scores


@register_criterion("sleb", units=("block", "attn", "mlp"))
@torch.no_grad()
def sleb_importance(model, input_ids, n: int | None = None, batch_size: int | None = None,
                    progress: bool = True, unit: str = "block") -> torch.Tensor:
    """SLEB: remove the block whose removal hurts calibration PPL least, re-score, repeat ``n`` times.

    The scores are ``greedy_scores``' (removal step, then ``n + rank``), so
    ``blocks_to_remove(scores, k)`` for any ``k <= n`` is exactly SLEB's first ``k`` removals.
    ``n=None`` removes 20 % of the blocks (the paper's mildest ratio). Each step is one
    prefix-reusing ``ppl`` sweep over the surviving units. For halves this is BlockPruner's and
    FinerCut's iterative search.
    """
    _check_blocks_for("sleb", model)
    units = get_unit(unit)
    alive = len(units.alive(model))
    n = num_blocks_for_ratio(alive, 0.2) if n is None else n
    if not 1 <= n <= alive - 1:
        raise ValueError(f"n={n} {units.plural} to remove greedily must be in 1..{alive - 1} "
                         f"(at least one {units.noun} must stay)")
    return greedy_scores(model, unit, n, lambda: ppl_importance(model, input_ids, batch_size=batch_size,
                                                                 progress=False, unit=unit),
                         desc=f"sleb ({unit})", progress=progress)


# ---- baselines ----------------------------------------------------------------------------------

@register_criterion("reverse", needs_data=False, units=("block", "attn", "mlp"))
def reverse_order(model, input_ids=None, unit: str = "block") -> torch.Tensor:
    """Deepest first: score = L - i (no data). The baseline every data-driven criterion must beat."""
    n = len(get_blocks(model))
    return _gone_infinite(torch.arange(n, 0, -1, dtype=torch.float64), model, unit)


@register_criterion("random", needs_data=False, units=("block", "attn", "mlp"))
def random_order(model, input_ids=None, seed: int = 0, unit: str = "block") -> torch.Tensor:
    """A seeded random permutation as scores: what choosing blindly gives."""
    g = torch.Generator().manual_seed(seed)
    return _gone_infinite(torch.randperm(len(get_blocks(model)), generator=g).double(), model, unit)
