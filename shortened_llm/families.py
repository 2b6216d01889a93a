"""The ground floor: where each model family keeps everything pruning touches.

One table, ``FAMILIES``, keyed by ``config.model_type`` (never by substrings of a model name),
says for each family where the decoder blocks are, which attribute holds a block's KV-cache
index, which config lists follow a removal, whether it needs BOS on every sequence (Gemma:
the official code found WikiText-2 PPL of 3.1 million without it and 17 with it), where a
block's attention and MLP halves sit (sub-block pruning) and which projections width
pruning slices. Block access (``get_blocks``, ``set_blocks``), ``unwrap`` of a peft wrapper,
parameter counting and the tiny random models of every family live here too.

Imports nothing of the package but ``errors``: every step (pruning, scoring, loading) builds
on it, like nanoGPT's ``model.py``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import unknown_name

__all__ = [
    "Family",
    "SubLayers",
    "WidthProjections",
    "FAMILIES",
    "family_of",
    "unwrap",
    "get_path",
    "get_blocks",
    "set_blocks",
    "num_blocks",
    "count_params",
    "hooks_removed",
    "TINY_CONFIGS",
    "tiny_random_model",
]


@dataclass(frozen=True)
class SubLayers:
    """Where a pre-norm block keeps each half: the sub-layer module and the norm(s) feeding it only.

    Only for families whose block is exactly ``h += attn(norm1(h)); h += mlp(norm2(h))`` and whose
    config has no per-layer attention types (renumbering attentions would misalign a per-layer
    sliding/global list).
    """

    attn: str
    attn_norms: tuple[str, ...]
    mlp: str
    mlp_norms: tuple[str, ...]


@dataclass(frozen=True)
class WidthProjections:
    """The Linear layers width pruning slices (LLM-Pruner-style, Llama-shaped blocks).

    A KV group is rows of ``qkv`` and columns of ``out``; an MLP channel is a row of each
    ``gate_up`` and a column of ``down``.
    """

    attn: str = "self_attn"
    qkv: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
    out: str = "o_proj"
    mlp: str = "mlp"
    gate_up: tuple[str, str] = ("gate_proj", "up_proj")
    down: str = "down_proj"


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its decoder blocks and what a removal must update.

    Every field is checked against the transformers 5.24 source of the family; the tests in
    ``tests/test_families.py`` prune a tiny random model of each family and fail when a
    field here is wrong (stale cache index, per-layer list out of step, reload mismatch).
    """

    blocks: str  # dotted path from the *ForCausalLM module to the nn.ModuleList of blocks
    attn: str  # dotted path from a block to its attention module (holds ``layer_idx``: its KV-cache slot)
    bos_every: bool = False  # prepend BOS to every calibration sample and PPL segment
    # Prepend BOS to zero-shot contexts (lm-eval's add_bos_token). The official harness (lm-eval
    # 3326c54) encoded without special tokens; Gemma needs BOS, as the paper's Gemma rows did.
    zero_shot_bos: bool = False
    # Config attributes with one entry per block (``layer_types``: "sliding_attention" or
    # "full_attention"): the entries of the kept blocks stay, in order.
    layer_lists: tuple[str, ...] = ()
    # Config attributes that mean "the first k blocks" (Qwen's ``max_window_layers``: blocks
    # below k use full attention): k becomes the number of kept blocks that were below k.
    first_k_counts: tuple[str, ...] = ()
    # Config attributes that state a period of ``layer_types`` (Gemma-3's ``sliding_window_pattern``:
    # every k-th block is global): kept when the pruned layout still has a period, else dropped
    # so that ``layer_types`` alone describes the layout.
    layer_periods: tuple[str, ...] = ()
    # Dotted paths from a block to other modules holding ``layer_idx`` ("" = the block itself).
    extra_index_paths: tuple[str, ...] = ()
    # Dotted path from a block to the linear layer whose output the block adds to the residual
    # stream as its MLP's contribution (ReplaceMe folds its map in there); None where a norm
    # comes between (Gemma-2/3's post_feedforward_layernorm), so no linear map can be folded.
    mlp_out: str | None = "mlp.down_proj"
    # The attention and MLP halves for sub-block pruning (unit "attn"/"mlp"); None = whole blocks only.
    sublayers: SubLayers | None = None
    # The projections width pruning slices; None = width pruning does not apply (fused or other names).
    width: WidthProjections | None = None

    @property
    def index_paths(self) -> tuple[str, ...]:
        """Every module of a block whose ``layer_idx`` must equal the block's position."""
        return (self.attn, *self.extra_index_paths)


_SLIDING = ("layer_types",)
_PRE_NORM = SubLayers("self_attn", ("input_layernorm",), "mlp", ("post_attention_layernorm",))
_LLAMA_WIDTH = WidthProjections()
FAMILIES: dict[str, Family] = {
    "llama": Family("model.layers", "self_attn", sublayers=_PRE_NORM, width=_LLAMA_WIDTH),
    # one sliding_window for every block
    "mistral": Family("model.layers", "self_attn", sublayers=_PRE_NORM, width=_LLAMA_WIDTH),
    "qwen2": Family("model.layers", "self_attn", layer_lists=_SLIDING, first_k_counts=("max_window_layers",),
                    width=_LLAMA_WIDTH),
    "qwen3": Family("model.layers", "self_attn", layer_lists=_SLIDING, first_k_counts=("max_window_layers",),
                    width=_LLAMA_WIDTH),
    "gemma": Family("model.layers", "self_attn", bos_every=True, zero_shot_bos=True, width=_LLAMA_WIDTH),
    "gemma2": Family("model.layers", "self_attn", bos_every=True, zero_shot_bos=True, layer_lists=_SLIDING,
                     mlp_out=None, width=_LLAMA_WIDTH),
    "gemma3_text": Family("model.layers", "self_attn", bos_every=True, zero_shot_bos=True, layer_lists=_SLIDING,
                          layer_periods=("sliding_window_pattern", "_sliding_window_pattern"), extra_index_paths=("",),
                          mlp_out=None, width=_LLAMA_WIDTH),
    # one sliding_window for every block; fused qkv_proj and gate_up_proj: no width pruning
    "phi3": Family("model.layers", "self_attn", sublayers=_PRE_NORM),
    "opt": Family("model.decoder.layers", "self_attn", mlp_out="fc2"),
    "gpt_neox": Family("gpt_neox.layers", "attention", mlp_out="mlp.dense_4h_to_h"),
}

# Tiny random models (tests, notebook 03): small enough that a forward takes milliseconds,
# shaped like the family (grouped-query attention, sliding windows of 8 tokens so that a
# 20-token generation crosses the window, Gemma's sliding/global alternation).
_TINY_COMMON = {"hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 256}
_TINY_GQA = {"intermediate_size": 64, "num_key_value_heads": 2}
TINY_CONFIGS: dict[str, dict] = {
    "llama": {**_TINY_GQA},
    "mistral": {**_TINY_GQA, "sliding_window": 8},
    "qwen2": {**_TINY_GQA, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
    "qwen3": {**_TINY_GQA, "head_dim": 8, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
    "gemma": {**_TINY_GQA, "head_dim": 8},
    "gemma2": {**_TINY_GQA, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 8},
    "gemma3_text": {**_TINY_GQA, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 8,
                    "sliding_window_pattern": 3},
    "phi3": {**_TINY_GQA, "sliding_window": 8},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32},
    "gpt_neox": {"intermediate_size": 64},
}


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper, if any."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def family_of(model_or_config) -> Family:
    """The ``FAMILIES`` entry of a model or config, keyed by ``config.model_type``.

    Anything else (an encoder-only BERT, a vision model, a model without a config) is
    refused here, before any work, with the list of supported families.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        what = type(model_or_config).__name__
        raise ValueError(
            f"model_type={model_type!r} ({what}) is not a supported decoder-only family: depth pruning needs a "
            f"causal LM whose decoder blocks are an nn.ModuleList. Supported: {', '.join(sorted(FAMILIES))}. "
            "Encoder-only and vision-only models have no such blocks; for another decoder family, add an "
            "entry to shortened_llm.families.FAMILIES (and TINY_CONFIGS, to test it)."
        )
    return FAMILIES[model_type]


def get_path(obj, dotted: str):
    """``get_path(model, "model.layers")``: the attribute a family's dotted name points to."""
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model`` in order, as the model itself iterates them."""
    model = unwrap(model)
    blocks = get_path(model, family_of(model).blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"expected an nn.ModuleList at {family_of(model).blocks}, got {type(blocks).__name__}")
    return blocks


def set_blocks(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Put ``blocks`` in place of the model's block list (no config update: see prune.py)."""
    model = unwrap(model)
    parent_path, _, name = family_of(model).blocks.rpartition(".")
    setattr(get_path(model, parent_path) if parent_path else model, name, blocks)


def num_blocks(model: nn.Module) -> int:
    return len(get_blocks(model))


def tiny_random_model(model_type: str = "llama", num_layers: int = 4, vocab_size: int = 128, seed: int = 0,
                      tokenizer=None, **overrides) -> nn.Module:
    """A random ``model_type``-shaped causal LM of ``num_layers`` blocks, built offline from its config class.

    For tests and for showing that pruning works beyond Llama without a download: hidden
    size 32, so a forward pass takes milliseconds. With ``tokenizer`` the vocabulary size
    and BOS/EOS/PAD ids follow it (so ``perplexity`` can run on real text); ``overrides``
    replace any config value. Float32, eval mode, on CPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY_CONFIGS:
        raise unknown_name("tiny model_type", model_type, sorted(TINY_CONFIGS))
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    values = {**_TINY_COMMON, **TINY_CONFIGS[model_type], **ids, "vocab_size": vocab_size,
              "num_hidden_layers": num_layers, **overrides}
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@contextlib.contextmanager
def hooks_removed(handles: list):
    """Remove these torch hooks when the block ends, however it ends: a hook left behind would keep
    capturing (or changing) every later forward pass of the model."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def count_params(model: nn.Module) -> int:
    """Parameters counted once even when tied (embeddings and LM head share one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
