"""Architecture-only models: the paper's model shapes with random weights, for speed tests.

Latency, throughput and memory depend on the shapes, not on the weights, so the paper's
efficiency figures (LLaMA-1-7B, Vicuna-13B; Llama-3-8B for GQA) can be reproduced on a
GPU without downloading a checkpoint. The configs shipped in ``shortened_llm/configs/``
were written from the public architecture hyperparameters (each file's ``_source`` says
which); their parameter counts equal the official ones (tests check them against
``shortened_llm/reference/official_results.csv``).

Pruned versions are built directly at the smaller shape (no dense model is allocated
first): depth = fewer blocks, width = the head counts and ``intermediate_size`` that
``width.plan_width`` picks for the same parameter count.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from .errors import unknown_name
from .models import get_blocks
from .prune import num_blocks_for_ratio, num_blocks_to_remove

__all__ = ["CONFIGS_DIR", "PAPER_RATIOS", "architecture_names", "architecture_config", "pruned_config",
           "architecture_only_model"]

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
PAPER_RATIOS = (0.2, 0.35)  # the paper's pruning ratios (e.g. LLaMA-7B -> 5.5B and 4.5B)
Prune = Literal["depth", "width"]


def architecture_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def architecture_config(name: str):
    """The shipped config ``name`` (``llama-1-7b``, ``vicuna-13b``, ``llama-3-8b``) as a transformers config."""
    from transformers import AutoConfig

    path = CONFIGS_DIR / f"{name}.json"
    if not path.exists():
        raise unknown_name("architecture", name, architecture_names())
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config.name_or_path = f"arch:{name}"
    return config


def _block_params(config) -> int:
    """Parameters in one block, counted on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM

    small = type(config).from_dict({**config.to_dict(), "num_hidden_layers": 1})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(small)
    return sum(p.numel() for p in model.model.layers[0].parameters())


def pruned_config(config, prune: Prune | None, ratio: float = 0.2):
    """``config`` after depth or width pruning of ``ratio`` of its blocks' parameters."""
    from .width import plan_width, width_config

    if prune is None:
        return config
    n_blocks = config.num_hidden_layers
    n_removed = num_blocks_for_ratio(n_blocks, ratio)
    if prune == "depth":
        new = type(config).from_dict(config.to_dict())
        new.num_hidden_layers = n_blocks - n_removed
        if isinstance(getattr(new, "layer_types", None), list):
            new.layer_types = new.layer_types[: new.num_hidden_layers]
        return new
    if prune == "width":  # same parameter count as the depth-pruned model
        return width_config(config, plan_width(config, n_removed * _block_params(config), n_blocks))
    raise ValueError(f"prune={prune!r} must be None, 'depth' or 'width'")


def architecture_only_model(name: str, dtype: torch.dtype | str = torch.float16, device: str | torch.device | None = None,
                            prune: Prune | None = None, ratio: float = 0.2, seed: int = 0):
    """A model of the shape ``name`` (optionally depth- or width-pruned) with random weights.

    ``device=None`` picks CUDA when present; ``device="meta"`` builds it without memory,
    enough to count parameters. Random weights give meaningless text but real timings.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = pruned_config(architecture_config(name), prune, ratio)
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


# ---- the official block counts of a preset (``Preset.block_counts``), per architecture ----------

# What identifies an architecture in a loaded model's config: the shape, not the name (a local
# copy of Vicuna-13B has no name we could trust). Any model of that shape gets its counts.
_SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size")


def official_counts(preset, config) -> tuple:
    """``preset.block_counts`` for the architecture of ``config`` (matched by shape); () if none."""
    shape = tuple(getattr(config, k, None) for k in _SHAPE_KEYS)
    names = {c.architecture for c in preset.block_counts}
    same = {n for n in names if tuple(getattr(architecture_config(n), k, None) for k in _SHAPE_KEYS) == shape}
    return tuple(c for c in preset.block_counts if c.architecture in same)


def n_blocks_for(preset, config, ratio: float) -> int:
    """Blocks to remove for ``ratio``: the official count where this architecture has one, else rounded."""
    official = [c.n_blocks for c in official_counts(preset, config) if abs(c.ratio - ratio) < 1e-9]
    if official:
        return official[0]
    return num_blocks_to_remove(config.num_hidden_layers, ratio=ratio)


def removal_counts(preset, config) -> list[int]:
    """The block counts a sweep removes: the official ones for this architecture, else one per ``preset.ratios``."""
    official = official_counts(preset, config)
    if official:
        return sorted({c.n_blocks for c in official})
    return sorted({n_blocks_for(preset, config, r) for r in preset.ratios})


def block_count_params(count) -> tuple[int, int]:
    """(dense, pruned) parameter counts of a ``presets.BlockCount``, from its config on the meta device (no memory)."""
    model = architecture_only_model(count.architecture, device="meta")
    dense = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in get_blocks(model)[0].parameters())
    return dense, dense - count.n_blocks * per_block


def param_share(count) -> float:
    """Share of the dense model's parameters a ``presets.BlockCount`` removes: what "20 %" stands for, roughly."""
    dense, pruned = block_count_params(count)
    return 1 - pruned / dense
