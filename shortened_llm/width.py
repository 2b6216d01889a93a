"""Width pruning, the baseline the paper compares against (LLM-Pruner-style structure, our own code).

Depth pruning removes whole blocks; width pruning keeps every block and makes each one
thinner: fewer attention heads and fewer MLP channels (Ma et al. 2023, "LLM-Pruner";
the paper's Section 4 compares against it and FLAP). Under grouped-query attention the
query heads of one group share a key/value head, so the unit removed from attention is a
whole KV group (its query heads, its key and value heads, and the matching columns of
``o_proj``). The unit removed from the MLP is one intermediate channel (a row of
``gate_proj`` and ``up_proj`` and a column of ``down_proj``).

Importance is magnitude (sum of |w| over the weights of the unit, LLM-Pruner's
"element-wise L1" without data), and the same number of units goes from every block
("uniform"), so the result is an ordinary Hugging Face model whose config says the new
head counts and ``intermediate_size``: ``save_pretrained`` then ``from_pretrained`` needs
no custom code.

The target is a parameter count, usually that of a depth-pruned model
(``width_prune(model, target_params=count_params(depth_model))``), so the two are compared
at equal size, as in the paper's Table 2.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .families import WidthProjections, count_params, family_of, get_blocks, unwrap
from .record import PruningRecord

__all__ = [
    "WidthPlan",
    "WidthRecord",
    "head_dim",
    "kv_group_rows",
    "unit_sizes",
    "plan_width",
    "width_config",
    "width_prune",
]

# The module names width pruning edits are each family's ``Family.width`` (families.FAMILIES):
# Llama-style blocks (Llama, Mistral, Qwen2/3, Gemma 1-3); None where projections are fused (Phi-3).


@dataclass(frozen=True)
class WidthPlan:
    """How many units every block loses; the same for all blocks (uniform width pruning)."""

    kv_groups_removed: int  # whole KV groups (each = heads_per_group query heads + 1 K and 1 V head)
    channels_removed: int  # MLP intermediate channels
    params_removed_per_block: int


@dataclass
class WidthRecord(PruningRecord):
    """``pruning.json`` of a width-pruned model: no block removed, every block thinner."""

    method: str = "width"
    kv_groups_removed: int = 0
    channels_removed: int = 0
    params_before: int | None = None
    params_after: int | None = None


def head_dim(config) -> int:
    """Width of one attention head: the config's ``head_dim`` when it states one (it need not be hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_group_rows(groups: torch.Tensor, heads_per_group: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The output rows of q and of k/v that the KV groups ``groups`` own: ``(q_rows, kv_rows)``.

    Group g owns query heads g*hpg .. (g+1)*hpg-1 (HF ``repeat_kv`` order) and KV head g; q_rows are
    also the input columns of o_proj. Width pruning keeps the best-scored groups, shearing the learned ones.
    """
    arange = torch.arange(heads_per_group * head_dim, device=groups.device)
    q_rows = (groups[:, None] * heads_per_group * head_dim + arange).flatten()
    kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim, device=groups.device)).flatten()
    return q_rows, kv_rows


def unit_sizes(config) -> dict[str, int]:
    """Parameters in one KV group and in one MLP channel of one block, from the config alone.

    Works on a config so that architecture-only models (no weights) can be planned too.
    """
    hidden, hd = config.hidden_size, head_dim(config)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    per_group_heads = heads // kv
    attn_bias = int(bool(getattr(config, "attention_bias", False)))
    mlp_bias = int(bool(getattr(config, "mlp_bias", False)))
    group = (
        per_group_heads * hd * (hidden + attn_bias)  # q rows (+ bias)
        + 2 * hd * (hidden + attn_bias)  # k and v rows (+ bias)
        + per_group_heads * hd * hidden  # o_proj columns
    )
    channel = 2 * (hidden + mlp_bias) + hidden  # gate and up rows (+ bias), down column
    return {"kv_group": group, "channel": channel, "kv_groups": kv, "heads_per_group": per_group_heads,
            "channels": config.intermediate_size, "head_dim": hd}


def plan_width(config, params_to_remove: int, num_blocks: int | None = None, kv_groups: int | None = None,
               channel_multiple: int = 1) -> WidthPlan:
    """Split ``params_to_remove`` evenly over the blocks, then between KV groups and channels.

    Each block must lose ``params_to_remove / num_blocks``. Whole KV groups are coarse (a
    model may have only 3), so we try every count of groups that leaves at least one and
    fill the rest with MLP channels; of the feasible splits we keep the one whose two
    removal shares (groups removed / groups, channels removed / channels) are closest, the
    nearest thing to LLM-Pruner's single ratio for both. ``kv_groups`` forces the count.
    """
    if params_to_remove <= 0:
        raise ValueError(f"params_to_remove={params_to_remove} must be > 0")
    if channel_multiple < 1:
        raise ValueError(f"channel_multiple={channel_multiple} must be >= 1")
    n_blocks = num_blocks or config.num_hidden_layers
    sizes = unit_sizes(config)
    per_block = params_to_remove / n_blocks
    candidates = range(sizes["kv_groups"]) if kv_groups is None else [kv_groups]
    best = None
    for g in candidates:
        if not 0 <= g < sizes["kv_groups"]:
            raise ValueError(f"kv_groups={g} must be in [0, {sizes['kv_groups'] - 1}]: at least one group must stay")
        rest = per_block - g * sizes["kv_group"]
        c = int(round(rest / sizes["channel"] / channel_multiple)) * channel_multiple
        if c < 0 or c >= sizes["channels"]:
            continue
        gap = abs(g / sizes["kv_groups"] - c / sizes["channels"])
        if best is None or gap < best[0]:
            best = (gap, g, c)
    if best is None:
        raise ValueError(
            f"cannot remove {params_to_remove:,} parameters by width: each of the {n_blocks} blocks would lose "
            f"{per_block:,.0f}, more than its {sizes['kv_groups'] - 1} removable KV groups and "
            f"{sizes['channels'] - 1} channels allow (or kv_groups={kv_groups} does not fit): use a smaller ratio"
        )
    _, g, c = best
    return WidthPlan(g, c, g * sizes["kv_group"] + c * sizes["channel"])


def width_config(config, plan: WidthPlan):
    """A copy of ``config`` with the head counts and ``intermediate_size`` after ``plan``."""
    sizes = unit_sizes(config)
    new = copy.deepcopy(config)
    new.head_dim = sizes["head_dim"]  # must be explicit: hidden_size / heads no longer gives it
    new.num_key_value_heads = sizes["kv_groups"] - plan.kv_groups_removed
    new.num_attention_heads = new.num_key_value_heads * sizes["heads_per_group"]
    new.intermediate_size = sizes["channels"] - plan.channels_removed
    return new


def _slice_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the kept output rows / input columns of ``layer``."""
    w = layer.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    bias = layer.bias is not None
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if bias:
        out.bias.data.copy_(layer.bias.data[rows] if rows is not None else layer.bias.data)
    return out


def _kept(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Indices of the units to keep (all but the ``n_remove`` smallest scores), in order."""
    drop = torch.argsort(scores, stable=True)[:n_remove]
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[drop] = False
    return mask.nonzero().flatten()


@torch.no_grad()
def _prune_attention(attn: nn.Module, names: WidthProjections, sizes: dict, n_remove: int) -> None:
    hd, hpg, kv = sizes["head_dim"], sizes["heads_per_group"], sizes["kv_groups"]
    q, k, v, o = (getattr(attn, n) for n in (*names.qkv, names.out))
    # Group g owns query heads g*hpg .. (g+1)*hpg-1 (HF repeat_kv order) and KV head g
    score = (
        q.weight.abs().double().view(kv, hpg * hd, -1).sum((1, 2))
        + k.weight.abs().double().view(kv, hd, -1).sum((1, 2))
        + v.weight.abs().double().view(kv, hd, -1).sum((1, 2))
        + o.weight.abs().double().view(o.weight.shape[0], kv, hpg * hd).sum((0, 2))
    )  # (kv,)
    groups = _kept(score.cpu(), n_remove).to(q.weight.device)
    q_rows, kv_rows = kv_group_rows(groups, hpg, hd)
    for name, layer in zip(names.qkv, (_slice_linear(q, rows=q_rows), _slice_linear(k, rows=kv_rows),
                                       _slice_linear(v, rows=kv_rows))):
        setattr(attn, name, layer)
    setattr(attn, names.out, _slice_linear(o, cols=q_rows))
    for name, value in (("num_heads", len(groups) * hpg), ("num_key_value_heads", len(groups))):
        if hasattr(attn, name):  # older transformers keep the counts on the module
            setattr(attn, name, value)


@torch.no_grad()
def _prune_mlp(mlp: nn.Module, names: WidthProjections, n_remove: int) -> None:
    gate, up, down = (getattr(mlp, n) for n in (*names.gate_up, names.down))
    score = gate.weight.abs().double().sum(1) + up.weight.abs().double().sum(1) + down.weight.abs().double().sum(0)
    keep = _kept(score.cpu(), n_remove).to(gate.weight.device)
    for name, layer in zip(names.gate_up, (_slice_linear(gate, rows=keep), _slice_linear(up, rows=keep))):
        setattr(mlp, name, layer)
    setattr(mlp, names.down, _slice_linear(down, cols=keep))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


_NEEDS = "width pruning needs Llama-style blocks (q/k/v/o_proj and gate/up/down_proj Linears)"


def _projections(model: nn.Module) -> WidthProjections:
    """The family's width names, checked against every block before anything changes."""
    names = family_of(model).width
    if names is None:
        raise TypeError(f"{_NEEDS}; model_type={model.config.model_type!r} has none (fused or other projections): "
                        "give its family a `width` entry in shortened_llm.families.FAMILIES if it has them")
    for block in get_blocks(model):
        attn, mlp = getattr(block, names.attn, None), getattr(block, names.mlp, None)
        missing = [f"{names.attn}.{n}" for n in (*names.qkv, names.out) if not isinstance(getattr(attn, n, None), nn.Linear)]
        missing += [f"{names.mlp}.{n}" for n in (*names.gate_up, names.down)
                    if not isinstance(getattr(mlp, n, None), nn.Linear)]
        if missing:
            raise TypeError(f"{_NEEDS}; {type(block).__name__} lacks {', '.join(missing)}")
    return names


def width_prune(model: nn.Module, ratio: float | None = None, target_params: int | None = None,
                kv_groups: int | None = None, channel_multiple: int = 1) -> nn.Module:
    """Make every block thinner, in place, and return the model.

    Give either ``target_params`` (e.g. the parameter count of a depth-pruned model) or
    ``ratio``: the share of the *block* parameters to remove, which is what removing
    ``ratio`` of the blocks by depth removes (embeddings and LM head are never pruned, in
    either method). The result lands within one MLP channel per block of the target.
    """
    inner = unwrap(model)
    blocks = get_blocks(inner)
    before = count_params(inner)
    if (ratio is None) == (target_params is None):
        raise ValueError(f"give exactly one of ratio={ratio} and target_params={target_params}")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise ValueError(f"ratio={ratio} must be in (0, 1): the share of block parameters to remove")
        to_remove = int(round(ratio * sum(count_params(b) for b in blocks)))
    else:
        if not 0 < target_params < before:
            raise ValueError(f"target_params={target_params:,} must be in (0, {before:,}), the model's current size")
        to_remove = before - int(target_params)
    names = _projections(inner)
    plan = plan_width(inner.config, to_remove, len(blocks), kv_groups, channel_multiple)
    sizes = unit_sizes(inner.config)
    for b in blocks:
        _prune_attention(getattr(b, names.attn), names, sizes, plan.kv_groups_removed)
        _prune_mlp(getattr(b, names.mlp), names, plan.channels_removed)
    new = width_config(inner.config, plan)
    for key in ("head_dim", "num_key_value_heads", "num_attention_heads", "intermediate_size"):
        setattr(inner.config, key, getattr(new, key))
    model.pruning = WidthRecord(
        original_num_blocks=len(blocks), criterion="magnitude", ratio=ratio, kv_groups_removed=plan.kv_groups_removed,
        channels_removed=plan.channels_removed, params_before=before, params_after=count_params(inner),
    )
    return model
