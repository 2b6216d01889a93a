"""Targeted structured pruning with learned masks (Sheared-LLaMA, Xia et al. 2023, Section 2.1).

Depth pruning scores blocks once and cuts; Sheared-LLaMA *learns* which layers, attention
heads, MLP channels and hidden dimensions to keep, so that the result has a given target
architecture. Each prunable unit gets a hard-concrete mask ``z`` (Louizos et al. 2018, as
CoFi and Sheared-LLaMA use it):

    u ~ U(0, 1);  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (r - l) + l, 0, 1)                  beta = 2/3, l = -0.1, r = 1.1
    E[L0] = P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))

The stretch past [0, 1] and the clamp give *exact* zeros and ones with non-zero probability,
and ``log_alpha`` gets gradients through the sample. Masks sit on:

- layers ``(L,)``: multiply a block's attention and MLP outputs (z = 0 is the block removed);
- KV groups ``(L, kv)``: multiply the head outputs before ``o_proj``; a group's mask covers its
  query heads too (grouped-query attention: they share its key and value);
- MLP channels ``(L, I)``: multiply the input of ``down_proj``;
- hidden dimensions ``(d,)``: multiply the embeddings and every block's two outputs, and the RMS
  norms average over the dimensions still alive, as the smaller model's norms will.

They are applied by forward hooks on the unchanged transformers model (``masked``). The
expected size of each structure ``E`` is driven to its target ``t`` by a Lagrangian term,
``lambda1 * (E - t) + lambda2 * (E - t)^2`` per structure, added to the LM loss. The masks (and
the weights) minimise it; the multipliers *maximise* it (gradient ascent), which is what turns
the penalty into a constraint: as long as ``E`` is off target, the multipliers keep growing.
Gaps are measured as shares of the structure's original size, so one learning rate suits all four.
The target is reached by a linear warm-up from the masks' initial expected size over ``target_warmup``
of the steps (CoFi's schedule; a sudden target would zero the masks at once).

The loop is a plain torch loop, not the HF ``Trainer``: the min-max needs three optimizers
(weights and masks descend, multipliers ascend with ``maximize=True``), masks drawn once per
forward pass, and a check on the masks after the last step; a Trainer would hide all three.

After training, each structure keeps exactly the target count of units, the top-k by
``log_alpha``, and the weights of the others are cut out (``prune_to_masks``): a plain HF model
of the target architecture (``from_pretrained``, no custom code) and a ``ShearRecord`` of what
was kept. If the expected size is still above the target by more than ``tolerance`` at the last
step, ``shear_model`` raises with the gap instead of cutting units the model still relies on.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .families import count_params, family_of, get_blocks, get_path, hooks_removed, unwrap
from .pruning_methods import PruningMethod, register_pruning_method
from .record import PruningRecord
from .width import head_dim, kv_group_rows

__all__ = [
    "SHAPE_KEYS",
    "ShearSettings",
    "PAPER_SETTINGS",
    "ShearRecord",
    "ShearResult",
    "HardConcrete",
    "ShearMasks",
    "check_target",
    "shape_of",
    "shape_params",
    "shape_for_ratio",
    "masked",
    "prune_to_masks",
    "shear_model",
    "save_sheared",
    "shear_pruned",
]

BETA, LIMIT_L, LIMIT_R = 2 / 3, -0.1, 1.1  # hard-concrete temperature and stretch limits (Louizos et al.)
# CoFi's bounds on log_alpha (log 1e-2, log 1e2), applied after every step: a gate pushed far past them would
# sit where sigmoid is flat, and the Lagrangian could no longer pull it back (P(z=0) stays >= 4.7 %).
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")


@dataclass(frozen=True)
class ShearSettings:
    """The optimisation of one shearing run. The defaults are the paper's (official ``pruning.sh``); a preset's
    ``shear_*`` fields give a run's values (``from_preset``), and its ``shear_batch`` / ``shear_block_size`` the batches."""

    mask_lr: float = field(default=1.0, metadata={"help": "Adam lr of the masks' log_alpha; paper: 1.0"})
    lambda_lr: float = field(default=1.0, metadata={"help": "lr of the Lagrange multipliers' gradient ascent; "
                                                                 "paper: 1.0"})
    weights_lr: float = field(default=1e-4, metadata={"help": "Adam lr of the model's weights; paper: 1e-4; 0 freezes them"})
    droprate_init: float = field(default=0.5, metadata={"help": "initial P(unit dropped) -> log_alpha; CoFi/paper: 0.5"})
    target_warmup: float = field(default=0.2, metadata={"help": "share of the steps over which the target moves "
                                                                "linearly from the initial expected size to the "
                                                                "target (CoFi); paper: 0.2 (640 of 3200 steps)"})
    tolerance: float = field(default=0.02, metadata={"help": "largest expected-size gap above target at the last "
                                                             "step, as a share of the structure; more raises"})
    domain_interval: int = field(default=50, metadata={"help": "dynamic batch loading: steps between weight "
                                                               "updates (m); paper: 50 while pruning"})

    def __post_init__(self):
        for name in ("mask_lr", "lambda_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.weights_lr < 0:
            raise ValueError(f"weights_lr={self.weights_lr} must be >= 0 (0 freezes the weights)")
        if not 0 < self.droprate_init < 1:
            raise ValueError(f"droprate_init={self.droprate_init} must be in (0, 1)")
        if not 0 <= self.target_warmup <= 1 or not 0 <= self.tolerance < 1:
            raise ValueError(f"target_warmup={self.target_warmup} must be in [0, 1] and tolerance={self.tolerance} in [0, 1)")
        if self.domain_interval < 1:
            raise ValueError(f"domain_interval={self.domain_interval} must be >= 1")

    @classmethod
    def from_preset(cls, preset) -> "ShearSettings":
        """The settings a preset's ``shear_*`` fields name (``presets.Preset`` sits below this module and knows none)."""
        return cls(**{f: getattr(preset, f"shear_{f}") for f in (
            "mask_lr", "lambda_lr", "weights_lr", "droprate_init", "target_warmup", "tolerance", "domain_interval")})


# The paper's pruning stage (official llmshearing/scripts/pruning.sh): 3,200 steps of 32 x 4,096 tokens = 0.42B
# tokens, lr 1.0 for masks and multipliers (lag_lr), 1e-4 for the weights, the target reached after 640 steps;
# dynamic batch loading every 50 steps. Preset "paper" states the same values (shear_* fields).
PAPER_SETTINGS = ShearSettings()


@dataclass
class ShearRecord(PruningRecord):
    """``pruning.json`` of a sheared model: the kept blocks (``removed_blocks``) and, inside them, what was kept.

    ``kept_kv_groups[i]`` and ``kept_channels[i]`` belong to the i-th *kept* block; indices are the
    original model's.
    """

    method: str = "shear"
    target: dict = field(default_factory=dict)
    kept_hidden: list[int] = field(default_factory=list)
    kept_kv_groups: list[list[int]] = field(default_factory=list)
    kept_channels: list[list[int]] = field(default_factory=list)
    expected_at_end: dict = field(default_factory=dict)
    steps: int = 0
    params_before: int | None = None
    params_after: int | None = None
    seconds: float | None = None  # of mask learning (the cut and the checks excluded)


@dataclass
class ShearResult:
    """What ``shear_model`` returns: the smaller model, its record, and the run's logs."""

    model: nn.Module
    record: ShearRecord
    log: list[dict]  # one row per step: losses, multipliers, expected shape
    seconds: float
    domains: object | None = None  # the domains.DynamicBatchLoader, when one was used


# ---- target shapes ------------------------------------------------------------------------------

def shape_of(config) -> dict[str, int]:
    """The five numbers of a Llama-shaped architecture that shearing can shrink."""
    return {k: int(getattr(config, k)) for k in SHAPE_KEYS}


def check_target(config, target: dict) -> dict[str, int]:
    """The full target shape (missing keys keep the model's value), refused before any work if the family cannot take it.

    Heads go by whole KV groups, so the target's query heads per KV group must be the model's;
    giving only one of the two head counts derives the other.
    """
    unknown = set(target) - set(SHAPE_KEYS)
    if unknown:
        raise ValueError(f"unknown target key(s) {sorted(unknown)}: a target shape has {', '.join(SHAPE_KEYS)}")
    now = shape_of(config)
    per_group = now["num_attention_heads"] // now["num_key_value_heads"]
    full = {k: target.get(k, now[k]) for k in SHAPE_KEYS}
    if "num_attention_heads" in target and "num_key_value_heads" not in target:
        if target["num_attention_heads"] % per_group:
            raise ValueError(f"target num_attention_heads={target['num_attention_heads']} is not a multiple of the "
                             f"{per_group} query heads per KV group: heads are pruned by whole KV groups")
        full["num_key_value_heads"] = target["num_attention_heads"] // per_group
    elif "num_key_value_heads" in target and "num_attention_heads" not in target:
        full["num_attention_heads"] = target["num_key_value_heads"] * per_group
    for key, value in full.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"target {key}={value!r} must be an integer >= 1")
        if value > now[key]:
            raise ValueError(f"target {key}={value} is larger than the model's {now[key]}: shearing only removes")
    heads, kv = full["num_attention_heads"], full["num_key_value_heads"]
    if heads % kv or heads // kv != per_group:
        raise ValueError(
            f"target num_attention_heads={heads} and num_key_value_heads={kv}: KV groups do not fit, each of the "
            f"kept groups keeps its {per_group} query heads (grouped-query attention), so heads must be "
            f"{per_group} x num_key_value_heads")
    if full["hidden_size"] % heads:
        raise ValueError(f"target hidden_size={full['hidden_size']} is not a multiple of num_attention_heads={heads}: "
                         "transformers refuses to save such a config; pick a multiple of the heads")
    if full == now:
        raise ValueError(f"the target {full} is the model's own shape: nothing to prune")
    return full


def _config_for(config, shape: dict):
    new = copy.deepcopy(config)
    new.head_dim = head_dim(config)  # explicit: hidden_size / heads no longer gives it
    for key, value in shape.items():
        setattr(new, key, value)
    return new


def shape_params(config, shape: dict) -> int:
    """Parameters of ``config``'s architecture at ``shape`` (built on the meta device: no memory, exact)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config_for(config, shape))
    return count_params(model)


def shape_for_ratio(config, ratio: float) -> dict[str, int]:
    """A target shape with ``ratio`` of the parameters removed (embeddings and LM head included).

    A ratio fixes one number and a shape needs five, so the rule is: layers and heads stay, and
    ``hidden_size`` and ``intermediate_size`` shrink by one common factor, the hidden size being the
    largest *multiple of the head count* whose count is at most the target (transformers refuses to
    save a config whose hidden size the heads do not divide), then ``intermediate_size`` the largest
    that still fits, to close the gap one step of hidden sizes leaves (bisections). Give a shape
    instead to prune layers or heads too, as the paper's targets do.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio={ratio} must be in (0, 1): the share of the parameters to remove")
    now = shape_of(config)
    goal = (1 - ratio) * shape_params(config, now)
    step = now["num_attention_heads"]

    def at(hidden: int, inter: int | None = None) -> dict:
        inter = max(1, round(now["intermediate_size"] * hidden / now["hidden_size"])) if inter is None else inter
        return {**now, "hidden_size": hidden, "intermediate_size": inter}

    def largest(lo: int, hi: int, shape_of_k) -> int:  # largest k in [lo, hi] with params <= goal (lo fits)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if shape_params(config, shape_of_k(mid)) <= goal:
                lo = mid
            else:
                hi = mid - 1
        return lo

    if shape_params(config, at(step)) > goal:
        raise ValueError(f"ratio={ratio} leaves fewer parameters than hidden_size={step} (one dimension per head) "
                         "does: use a smaller ratio or a target shape that removes layers")
    hidden = step * largest(1, now["hidden_size"] // step, lambda k: at(k * step))
    inter = largest(at(hidden)["intermediate_size"], now["intermediate_size"], lambda i: at(hidden, i))
    return at(hidden, inter)


# ---- hard-concrete masks --------------------------------------------------------------------------

class HardConcrete(nn.Module):
    """Hard-concrete gates over a tensor of units (the last dim is what ``top_k`` ranks)."""

    def __init__(self, shape: tuple[int, ...], droprate_init: float):
        super().__init__()
        start = min(max(math.log(1 - droprate_init) - math.log(droprate_init), LOG_ALPHA_RANGE[0]), LOG_ALPHA_RANGE[1])
        self.log_alpha = nn.Parameter(torch.full(shape, start))

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / BETA)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)

    def mean(self) -> torch.Tensor:
        """The noise-free gate (u = 1/2): what held-out losses are measured with during training."""
        return (torch.sigmoid(self.log_alpha) * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)

    def expected_l0(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))

    def constrain(self) -> None:
        self.log_alpha.data.clamp_(*LOG_ALPHA_RANGE)

    def top_k(self, k: int) -> torch.Tensor:
        """Exactly ``k`` ones per row of the last dim: the units with the largest ``log_alpha``."""
        keep = torch.topk(self.log_alpha.detach(), k, dim=-1).indices
        return torch.zeros_like(self.log_alpha).scatter(-1, keep, 1.0)


class ShearMasks(nn.Module):
    """One ``HardConcrete`` per structure whose target is below the model's size; the rest stay 1."""

    STRUCTURES = ("layers", "kv_groups", "channels", "hidden")
    _SHAPE_KEY = {"layers": "num_hidden_layers", "kv_groups": "num_key_value_heads", "channels": "intermediate_size",
                  "hidden": "hidden_size"}

    def __init__(self, config, target: dict, droprate_init: float = 0.5):
        super().__init__()
        now = shape_of(config)
        n_layers = now["num_hidden_layers"]
        self.sizes = {s: now[self._SHAPE_KEY[s]] for s in self.STRUCTURES}
        self.target = {s: target[self._SHAPE_KEY[s]] for s in self.STRUCTURES}
        shapes = {"layers": (n_layers,), "kv_groups": (n_layers, self.sizes["kv_groups"]),
                  "channels": (n_layers, self.sizes["channels"]), "hidden": (self.sizes["hidden"],)}
        self.gates = nn.ModuleDict({s: HardConcrete(shapes[s], droprate_init) for s in self.STRUCTURES
                                    if self.target[s] < self.sizes[s]})

    def expected(self) -> dict[str, torch.Tensor]:
        """Expected kept units per structure (per layer for heads and channels), differentiable."""
        out = {}
        for s, gate in self.gates.items():
            l0 = gate.expected_l0()
            out[s] = l0.sum(-1).mean() if l0.dim() == 2 else l0.sum()
        return out

    def gaps(self, progress: float = 1.0, start: dict | None = None) -> dict[str, torch.Tensor]:
        """(expected - target) / original size per structure, the target moved ``progress`` of the way from
        ``start`` (the expected sizes before training; default the full sizes) to the final target."""
        expected = self.expected()
        start = start or self.sizes
        return {s: (expected[s] - (start[s] + progress * (self.target[s] - start[s]))) / self.sizes[s]
                for s in expected}

    def draw(self, mode: str) -> dict[str, torch.Tensor]:
        """The gates for one forward pass: ``sample`` (training), ``mean`` (noise-free) or ``final`` (top-k 0/1)."""
        if mode == "sample":
            return {s: g.sample() for s, g in self.gates.items()}
        if mode == "mean":
            return {s: g.mean() for s, g in self.gates.items()}
        if mode == "final":
            return {s: g.top_k(self.target[s]) for s, g in self.gates.items()}
        raise ValueError(f"mode={mode!r} must be 'sample', 'mean' or 'final'")

    def kept(self) -> dict[str, list]:
        """Indices kept by the final masks: sorted, per layer for heads and channels (all when unmasked)."""
        final = self.draw("final")
        out = {}
        for s in self.STRUCTURES:
            if s not in final:
                full = list(range(self.sizes[s]))
                out[s] = [list(full) for _ in range(self.sizes["layers"])] if s in ("kv_groups", "channels") else full
            elif final[s].dim() == 2:
                out[s] = [row.nonzero().flatten().tolist() for row in final[s]]
            else:
                out[s] = final[s].nonzero().flatten().tolist()
        return out


# ---- applying masks with hooks --------------------------------------------------------------------

_NEEDS = ("shearing needs pre-norm Llama-shaped blocks (families.FAMILIES entries with both `sublayers` and "
          "`width`: q/k/v/o_proj, gate/up/down_proj, RMS norms before each half)")


def _parts(model: nn.Module):
    """``(family, inner model, blocks, final norm)``, refused for a family shearing cannot mask."""
    inner = unwrap(model)
    family = family_of(inner)
    if family.width is None or family.sublayers is None:
        raise TypeError(f"{_NEEDS}; model_type={inner.config.model_type!r} is not one")
    base = get_path(inner, family.blocks.rpartition(".")[0])
    norm = getattr(base, "norm", None)
    if norm is None or not hasattr(norm, "weight"):
        raise TypeError(f"{_NEEDS}; {type(base).__name__} has no final `norm`")
    return family, inner, get_blocks(inner), norm


def _rms_rescaler(z: dict):
    """Forward hook on an RMS norm: average the squares over the hidden dims whose gate is not 0 (as the cut
    model does, which has only those): ``w * x / rms(x)`` times ``rms_all(x) / rms_alive(x)``."""

    def hook(module, args, output):
        alive = z["hidden"] != 0  # (d,)
        x = args[0].float()
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        full = x.pow(2).mean(-1, keepdim=True)
        kept = x.pow(2).sum(-1, keepdim=True) / alive.sum()
        return (output.float() * torch.sqrt((full + eps) / (kept + eps))).to(output.dtype)

    return hook


@contextlib.contextmanager
def masked(model: nn.Module, masks: ShearMasks, mode: str = "sample"):
    """Run ``model`` with the masks applied by forward hooks; gates are drawn once per forward pass."""
    family, inner, blocks, final_norm = _parts(model)
    names, halves = family.width, family.sublayers
    hpg = inner.config.num_attention_heads // inner.config.num_key_value_heads
    z: dict[str, torch.Tensor] = {}

    def draw(_module, _args):
        z.clear()
        z.update(masks.draw(mode))

    def scale_out(i):  # a block half's output, times its layer gate and the hidden gate
        def hook(_module, _args, out):
            if "layers" in z:
                out = out * z["layers"][i]
            return out * z["hidden"] if "hidden" in z else out
        return hook

    def heads_in(i):
        def hook(_module, args):
            if "kv_groups" not in z:
                return None
            x = args[0]  # (B, T, heads * head_dim)
            g = z["kv_groups"][i].repeat_interleave(hpg)  # (heads,) a group's gate on each of its query heads
            return (x.view(*x.shape[:-1], g.numel(), -1) * g[:, None]).view(x.shape),
        return hook

    def channels_in(i):
        def hook(_module, args):
            return (args[0] * z["channels"][i],) if "channels" in z else None
        return hook

    handles = [inner.register_forward_pre_hook(draw)]
    if "hidden" in masks.gates:
        handles.append(inner.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out * z["hidden"]))
        norms = [final_norm] + [get_path(b, n) for b in blocks for n in (*halves.attn_norms, *halves.mlp_norms)]
        handles += [norm.register_forward_hook(_rms_rescaler(z)) for norm in norms]
    for i, block in enumerate(blocks):
        attn, mlp = getattr(block, names.attn), getattr(block, names.mlp)
        o_proj, down = getattr(attn, names.out), getattr(mlp, names.down)
        handles += [o_proj.register_forward_pre_hook(heads_in(i)), o_proj.register_forward_hook(scale_out(i)),
                    down.register_forward_pre_hook(channels_in(i)), down.register_forward_hook(scale_out(i))]
    with hooks_removed(handles):
        yield model


# ---- cutting the model to the final masks ---------------------------------------------------------

def _narrow(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    """Keep ``index`` along ``dim`` of parameter ``name`` (weight or bias) of ``module``, in place."""
    p = getattr(module, name, None)
    if p is None:
        return
    setattr(module, name, nn.Parameter(p.data.index_select(dim, index.to(p.device)).clone(), requires_grad=p.requires_grad))


def _narrow_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    if rows is not None:
        _narrow(layer, "weight", 0, rows)
        _narrow(layer, "bias", 0, rows)
        layer.out_features = len(rows)
    if cols is not None:
        _narrow(layer, "weight", 1, cols)
        layer.in_features = len(cols)


@torch.no_grad()
def prune_to_masks(model: nn.Module, masks: ShearMasks, record: ShearRecord | None = None) -> nn.Module:
    """Cut ``model`` in place to the final (top-k) masks: a plain HF model of the target shape; returns it.

    Its logits equal those of ``masked(model, masks, "final")``; ``model.pruning`` becomes the record.
    """
    from .prune import remove_blocks

    family, inner, blocks, final_norm = _parts(model)
    names, halves = family.width, family.sublayers
    config = inner.config
    hd, hpg = head_dim(config), config.num_attention_heads // config.num_key_value_heads
    kept = masks.kept()
    layers = kept["layers"]
    before = count_params(inner)
    record = record or ShearRecord(original_num_blocks=len(blocks))
    record.kept_hidden = kept["hidden"]
    record.kept_kv_groups = [kept["kv_groups"][i] for i in layers]
    record.kept_channels = [kept["channels"][i] for i in layers]
    record.params_before = before
    hidden = torch.tensor(kept["hidden"])
    tied = inner.get_output_embeddings() is not None and \
        inner.get_output_embeddings().weight is inner.get_input_embeddings().weight
    for i, block in enumerate(blocks):
        if i not in layers:
            continue
        attn, mlp = getattr(block, names.attn), getattr(block, names.mlp)
        groups = torch.tensor(kept["kv_groups"][i])
        q_rows, kv_rows = kv_group_rows(groups, hpg, hd)
        q, k, v = (getattr(attn, n) for n in names.qkv)
        _narrow_linear(q, q_rows, hidden)
        _narrow_linear(k, kv_rows, hidden)
        _narrow_linear(v, kv_rows, hidden)
        _narrow_linear(getattr(attn, names.out), hidden, q_rows)
        channels = torch.tensor(kept["channels"][i])
        for n in names.gate_up:
            _narrow_linear(getattr(mlp, n), channels, hidden)
        _narrow_linear(getattr(mlp, names.down), hidden, channels)
        for n in (*halves.attn_norms, *halves.mlp_norms):
            _narrow(get_path(block, n), "weight", 0, hidden)
        for attr, value in (("num_heads", len(groups) * hpg), ("num_key_value_heads", len(groups)),
                            ("intermediate_size", len(channels))):
            for module in (attn, mlp):
                if hasattr(module, attr) and not isinstance(getattr(module, attr), nn.Module):
                    setattr(module, attr, value)  # older transformers keep the counts on the module
    embed = inner.get_input_embeddings()
    _narrow(embed, "weight", 1, hidden)
    embed.embedding_dim = len(hidden)
    _narrow(final_norm, "weight", 0, hidden)
    head = inner.get_output_embeddings()
    if tied:
        head.weight = embed.weight
    elif head is not None:
        _narrow_linear(head, cols=hidden)
    new = _config_for(config, {"hidden_size": len(hidden), "num_key_value_heads": masks.target["kv_groups"],
                               "num_attention_heads": masks.target["kv_groups"] * hpg,
                               "intermediate_size": masks.target["channels"]})
    for key in ("head_dim", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        setattr(config, key, getattr(new, key))
    model.pruning = record
    removed = [i for i in range(len(blocks)) if i not in layers]
    if removed:
        remove_blocks(model, removed, criterion="shear")  # layer indices, cache slots, per-layer lists, the record
    record.params_after = count_params(inner)
    return model


# ---- training ---------------------------------------------------------------------------------

def _lagrangian(gaps: dict, lambdas: nn.ParameterDict) -> torch.Tensor:
    return sum(lambdas[f"{s}_1"] * g + lambdas[f"{s}_2"] * g ** 2 for s, g in gaps.items())


def shear_model(model: nn.Module, tokenizer, target: dict | float, *, steps: int | None = None, preset="smoke",
                settings: ShearSettings | None = None, data="c4", domains=None, seed: int | None = None,
                progress: bool = False) -> ShearResult:
    """Learn the masks for ``steps`` optimizer steps on packed text, then cut ``model`` to ``target``.

    ``steps`` (default the preset's ``shear_steps``) of ``shear_batch`` blocks of ``shear_block_size``
    tokens; ``settings`` default to the preset's ``shear_*`` fields (``ShearSettings.from_preset``).

    ``target`` is a shape dict (``check_target``) or a parameter ratio (``shape_for_ratio``). Every
    check on the target runs before the first step. ``domains`` (a list of dataset names or a dict,
    see ``domains.DynamicBatchLoader``) turns on dynamic batch loading in place of ``data``; its
    reference losses are the dense model's, measured first. Returns a ``ShearResult``; the model
    is changed in place (it *is* ``result.model``).
    """
    from .presets import get_preset
    from .trainer import accumulation_steps, packed_rows

    _, inner, blocks, _ = _parts(model)
    shape = check_target(inner.config, shape_for_ratio(inner.config, target)
                         if isinstance(target, (int, float)) and not isinstance(target, bool) else dict(target))
    preset = get_preset(preset)
    steps = preset.shear_steps if steps is None else steps
    settings = ShearSettings.from_preset(preset) if settings is None else settings
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    prior = getattr(model, "pruning", None)
    if prior is not None and prior.method != "depth":
        raise ValueError(f"the model is already {prior.method}-pruned: shear a dense or depth-pruned model")
    seed = preset.seed if seed is None else seed
    micro = min(preset.cpt_micro_batch, preset.shear_batch)
    accum = accumulation_steps(preset.shear_batch, micro, 1, "shear")
    device = next(inner.parameters()).device
    torch.manual_seed(seed)
    loader = None
    if domains is not None:
        from .domains import DynamicBatchLoader

        loader = DynamicBatchLoader(tokenizer, domains, preset.shear_block_size, preset.cpt_val_blocks, seed)
        inner.eval()
        loader.measure_reference(inner, micro)  # the dense model, before any mask
    else:
        train_rows, _ = packed_rows(tokenizer, data, preset.shear_block_size, preset.cpt_val_blocks)
        train = torch.tensor([r["input_ids"] for r in train_rows], dtype=torch.long)  # (n, block_size)
        order = torch.randperm(len(train))
    record = ShearRecord(original_num_blocks=prior.original_num_blocks if prior else len(blocks),
                         removed_blocks=list(prior.removed_blocks) if prior else [], criterion="shear", target=shape)
    masks = ShearMasks(inner.config, shape, settings.droprate_init).to(device)
    lambdas = nn.ParameterDict({f"{s}_{j}": nn.Parameter(torch.zeros((), device=device))
                                for s in masks.gates for j in (1, 2)})
    mask_opt = torch.optim.Adam(masks.parameters(), lr=settings.mask_lr)
    # plain gradient ascent, lambda += lr * dL/dlambda (= the gap, or its square): Adam would move each
    # multiplier by ~lr per step whatever the gap, overshoot, and swing the masks past the target and back
    lambda_opt = torch.optim.SGD(lambdas.parameters(), lr=settings.lambda_lr, maximize=True)
    weights = [p for p in inner.parameters() if p.requires_grad]
    weight_opt = torch.optim.AdamW(weights, lr=settings.weights_lr, weight_decay=0.0) if settings.weights_lr > 0 else None
    if weight_opt is None:
        for p in weights:
            p.requires_grad_(False)
    warm = max(1, round(settings.target_warmup * steps))
    start = {s: float(v.detach()) for s, v in masks.expected().items()}  # the warm-up starts where the masks do
    log, drawn = [], 0
    inner.config.use_cache = False
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        inner.train()
        progress_share = min(1.0, step / warm)
        lm_total = 0.0
        with masked(inner, masks, "sample"):
            for _ in range(accum):
                if loader is not None:
                    x = loader.sample(micro)
                else:
                    idx = order[torch.arange(drawn, drawn + micro) % len(order)]
                    drawn += micro
                    x = train[idx]  # (micro, block_size), epochs in one fixed shuffled order
                x = x.to(device)
                lm = inner(input_ids=x, labels=x).loss
                (lm / accum).backward()
                lm_total += float(lm.detach()) / accum
        gaps = masks.gaps(progress_share, start)
        lagrangian = _lagrangian(gaps, lambdas)
        lagrangian.backward()  # masks descend, multipliers (maximize=True) ascend on the same term
        for opt in (mask_opt, lambda_opt, weight_opt):
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        for gate in masks.gates.values():
            gate.constrain()
        row = {"step": step, "lm_loss": lm_total, "lagrangian": float(lagrangian.detach()),
               **{f"expected_{s}": float(v.detach()) for s, v in masks.expected().items()},
               **{f"lambda_{k}": float(v.detach()) for k, v in lambdas.items()}}
        log.append(row)
        if loader is not None and step % settings.domain_interval == 0:
            inner.eval()
            with masked(inner, masks, "mean"):
                loader.update(step, loader.held_out_losses(inner, micro))
        if progress:
            print(f"shear step {step}/{steps}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"),
                  flush=True)
    seconds = time.perf_counter() - t0
    inner.config.use_cache = True
    inner.eval()
    for p in weights:
        p.requires_grad_(True)
    expected = {s: float(v.detach()) for s, v in masks.expected().items()}
    over = {s: (expected[s], masks.target[s], masks.sizes[s]) for s in expected
            if (expected[s] - masks.target[s]) / masks.sizes[s] > settings.tolerance}
    if over:
        gaps_text = "; ".join(f"{s}: expected {e:.1f} kept vs target {t} (gap {e - t:+.1f} of {n}, "
                              f"{(e - t) / n:+.1%} > tolerance {settings.tolerance:.0%})" for s, (e, t, n) in over.items())
        raise ValueError(f"steps={steps} were too few: the masks did not reach the target in {steps} steps: {gaps_text}. Train longer "
                           "(steps), or raise the multipliers' learning rate (preset shear_lambda_lr, ShearSettings.lambda_lr)")
    record.expected_at_end = expected
    record.steps = steps
    record.seconds = round(seconds, 2)
    prune_to_masks(model, masks, record)
    return ShearResult(model, record, log, seconds, loader)


def save_sheared(result: ShearResult, tokenizer, out_dir, overwrite: bool = False, info: dict | None = None):
    """Write the sheared model as a plain HF dir with ``pruning.json``, ``loss_log.csv``, ``training.json``
    and, with dynamic batch loading, ``domain_weights.csv``, in one atomic rename.

    Not ``models.save_model`` alone: the run's logs must be inside the same atomic dir, or a later
    ``overwrite`` would find files the package's manifest does not list (trainer methods do the same).
    """
    import json

    from .artifacts import atomic_dir
    from .trainer import write_loss_log, write_record

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        unwrap(result.model).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_record(tmp, result.record)
        write_loss_log(tmp / "loss_log.csv", result.log)
        if result.domains is not None:
            (tmp / "domain_weights.csv").write_text(result.domains.history_csv())
        (tmp / "training.json").write_text(json.dumps({"method": "shear", "steps": result.record.steps,
                                                       "seconds": result.seconds, **(info or {})}, indent=2) + "\n")
    return out_dir



def shear_pruned(model: nn.Module, tokenizer, ratio: float | None = None, target_params: int | None = None,
                 preset="smoke", **options) -> nn.Module:
    """The registry's shear entry: as many parameters removed as depth pruning at ``ratio`` of the blocks (or down
    to ``target_params``), through ``shape_for_ratio``'s shape; ``options`` go to ``shear_model``. Returns the model."""
    inner = unwrap(model)
    before = count_params(inner)
    to_remove = round(ratio * sum(count_params(b) for b in get_blocks(inner))) if ratio is not None \
        else before - int(target_params)
    if not 0 < to_remove < before:
        raise ValueError(f"target_params={target_params} must be below the model's {before:,} parameters and above 0")
    return shear_model(model, tokenizer, to_remove / before, preset=preset, **options).model


register_pruning_method(PruningMethod(
    "shear", "Sheared-LLaMA: learned masks over layers, KV groups, channels and hidden dims, then the cut "
             "(trains for the preset's shear_steps)", shear_pruned, needs_data=True, trains=True))
