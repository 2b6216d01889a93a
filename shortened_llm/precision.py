"""Which floating-point type a model runs in: ``dtype="auto"`` and what overrides it (issue 20).

bf16 keeps fp32's range with 8 bits of mantissa: half the memory, and where the hardware has
bf16 units many times the matmul speed (one EPYC core with AVX512-BF16: 102 GFLOPS in fp32,
1215 in bf16). Where it has none, bf16 is emulated and slower than fp32, so ``"auto"`` asks
the hardware. One function decides, strongest first:

1. an explicit ``dtype=`` argument, or the CLI's ``--dtype`` (``forced_dtype``: it reaches the
   loads a command makes inside the package, such as a retraining's);
2. the environment variable ``SHORTENED_LLM_DTYPE`` (the test suite sets ``float32``);
3. the preset's ``dtype`` field;
4. the hardware (``hardware_dtype``): CUDA -> bf16 where the GPU has it natively (Ampere and
   later), else fp16; Apple MPS -> fp16 (every Apple GPU and macOS runs fp16; bf16 only from
   macOS 14); CPU -> bf16 when it has AMX or AVX512-BF16, else fp32.

The choice comes with a one-line reason ("bf16: this CPU has AVX512-BF16"), printed once per
process to stderr (stdout stays clean for the CLI's JSON) and recorded in the artifacts'
metadata (``precision_record``). What a method needs in fp32 (block scoring, Taylor's
gradients) casts up where it runs (``importance.py``), whatever the model's dtype.
Imports nothing from the package: every step may ask it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass

import torch

from .dtypes import ALIASES, DTYPES, dtype_name, parse_dtype

__all__ = ["DTYPES", "ALIASES", "ENV_VAR", "DtypeChoice", "dtype_name", "parse_dtype", "hardware_dtype",
           "choose_dtype", "forced_dtype", "precision_record", "training_autocast", "floating_dtypes",
           "cast_dtypes"]

ENV_VAR = "SHORTENED_LLM_DTYPE"
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# bf16 / fp16 matrix products where the CPU lacks the units, measured on this package's EPYC with
# oneDNN limited to an older instruction set (ONEDNN_MAX_CPU_ISA), 1024x576 @ 576x1536, one thread
# (two runs on a shared machine: the ratios held, the absolute GFLOPS did not)
_SLOW_CPU = {torch.bfloat16: "matrix products 2-3x slower than float32 with AVX-512, 30-50x with AVX2 only",
             torch.float16: "matrix products about 30x slower than float32"}
_announced: set[str] = set()  # reasons already printed by this process
_forced: list["DtypeChoice"] = []  # innermost forced_dtype last


@dataclass(frozen=True)
class DtypeChoice:
    """A dtype and the one-line reason it was chosen."""

    dtype: torch.dtype
    reason: str  # "bf16: this CPU has AVX512-BF16"
    source: str = "hardware"  # argument, environment, preset or hardware

    @property
    def name(self) -> str:
        return dtype_name(self.dtype)

    def record(self) -> dict:
        """What the artifacts' metadata keep: ``{"dtype": "bfloat16", "reason": ...}``."""
        return {"dtype": self.name, "reason": self.reason}


def _device_type(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"  # load_model's own default
    return torch.device(device).type


def _cpu_bf16_units() -> list[str]:
    units = []
    if torch.cpu._is_amx_tile_supported():
        units.append("AMX")
    if torch.cpu._is_avx512_bf16_supported():
        units.append("AVX512-BF16")
    return units


def hardware_dtype(device=None) -> DtypeChoice:
    """What ``device`` (default: CUDA when present, else CPU, as ``load_model``) runs fastest, and why."""
    kind = _device_type(device)
    if kind == "cuda":
        name = torch.cuda.get_device_name(torch.device(device) if device is not None else None)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return DtypeChoice(torch.bfloat16, f"bf16: this CUDA GPU ({name}) has bf16 units")
        return DtypeChoice(torch.float16, f"fp16: this CUDA GPU ({name}) has no native bf16, fp16 is its fast type")
    if kind == "mps":
        return DtypeChoice(torch.float16, "fp16: Apple MPS runs fp16 on every Apple GPU and macOS; bf16 only from macOS 14")
    if kind == "cpu":
        units = _cpu_bf16_units()
        if units:
            return DtypeChoice(torch.bfloat16, f"bf16: this CPU has {' and '.join(units)}")
        return DtypeChoice(torch.float32, "fp32: this CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated, "
                                          "slower than fp32)")
    return DtypeChoice(torch.float32, f"fp32: no fast-dtype rule for device type {kind!r}")


def _warn_if_slow(dtype: torch.dtype, kind: str, source: str) -> None:
    if kind != "cpu" or dtype == torch.float32:
        return
    has_units = _cpu_bf16_units() if dtype == torch.bfloat16 else \
        (["AMX-FP16"] if torch.cpu._is_amx_fp16_supported() else [])
    if not has_units:
        units = "AMX or AVX512-BF16" if dtype == torch.bfloat16 else "AMX-FP16"
        warnings.warn(f"{dtype_name(dtype)} on a CPU without {units} (asked for by {source}) is emulated: "
                      f"{_SLOW_CPU[dtype]}. Use float32 (--dtype float32) unless memory is what you need.",
                      stacklevel=3)


@contextlib.contextmanager
def forced_dtype(dtype, source: str = "--dtype"):
    """Inside, every ``dtype="auto"`` resolves to ``dtype`` as if it were passed explicitly.

    What the CLI's ``--dtype`` does for a whole command; ``None`` or ``"auto"`` forces nothing.
    """
    value = None if dtype is None else parse_dtype(dtype, source)
    if value is None:
        yield
        return
    _forced.append(DtypeChoice(value, f"{_SHORT[value]}: {source} {dtype_name(value)}", "argument"))
    try:
        yield
    finally:
        _forced.pop()


def choose_dtype(dtype=None, preset=None, device=None, announce: bool = True) -> DtypeChoice:
    """The dtype a model runs in: explicit ``dtype`` (or ``forced_dtype``), else ``$SHORTENED_LLM_DTYPE``,
    else ``preset.dtype``, else the hardware.

    ``dtype`` and the preset field take ``"auto"`` (or ``None``) to pass the decision on.
    ``preset`` is a ``Preset`` or a preset name. The reason is printed once per process
    (``announce=False``: not at all); a half-precision dtype on a CPU without the units for it warns.
    """
    kind = _device_type(device)
    explicit = parse_dtype("auto" if dtype is None else dtype, "dtype")
    if explicit is not None:
        choice = DtypeChoice(explicit, f"{_SHORT[explicit]}: dtype={dtype_name(explicit)} was asked for", "argument")
        _warn_if_slow(explicit, kind, f"dtype={dtype_name(explicit)}")
        return choice  # the caller said so: nothing to announce
    if _forced:
        _warn_if_slow(_forced[-1].dtype, kind, _forced[-1].reason.split(": ", 1)[1])
        return _forced[-1]
    env = os.environ.get(ENV_VAR, "").strip()
    from_env = parse_dtype(env, ENV_VAR) if env else None
    if isinstance(preset, str):
        from .presets import get_preset

        preset = get_preset(preset)
    preset_value = getattr(preset, "dtype", "auto") if preset is not None else "auto"
    from_preset = parse_dtype(preset_value, "Preset.dtype")
    if from_env is not None:
        choice = DtypeChoice(from_env, f"{_SHORT[from_env]}: {ENV_VAR}={env}", "environment")
    elif from_preset is not None:
        choice = DtypeChoice(from_preset, f"{_SHORT[from_preset]}: preset {preset.name!r} sets dtype={preset_value!r}",
                             "preset")
    else:
        choice = hardware_dtype(device)
    if choice.source != "hardware":
        _warn_if_slow(choice.dtype, kind, choice.reason.split(": ", 1)[1])
    if announce and choice.reason not in _announced:
        _announced.add(choice.reason)
        print(f"shortened_llm: dtype {choice.name} ({choice.reason})", file=sys.stderr)
    return choice


def precision_record(model) -> dict:
    """``{"dtype", "reason"}`` of ``model`` for metadata: ``load_model``'s choice, or what the weights are now.

    A model cast after loading (``model.to(torch.bfloat16)``) or built without ``load_model``
    records its weights' dtype and says so, so the record never claims a choice that was undone.
    """
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    params = [p for p in inner.parameters() if p.is_floating_point()]
    now = dtype_name(params[0].dtype) if params else "none"
    chosen = getattr(inner, "precision", None) or getattr(model, "precision", None)
    if isinstance(chosen, dict) and chosen.get("dtype") == now:
        return dict(chosen)
    return {"dtype": now, "reason": "the model's weights (not loaded by load_model, or cast after loading)"}


def training_autocast(model_dtype: torch.dtype, mixed_precision: str = "none", cuda: bool = False) -> torch.dtype | None:
    """The autocast a run trains under, the one rule ``trainer.master_weights`` and the protocol card read:
    fp16 where the preset asks for fp16 AMP and it can run (CUDA), else bf16 on a bf16 model, else none (fp32)."""
    if mixed_precision == "fp16" and cuda:
        return torch.float16
    return torch.bfloat16 if model_dtype == torch.bfloat16 else None


def floating_dtypes(model) -> dict[str, torch.dtype]:
    """The dtype of every floating parameter and buffer of ``model``, by name: what ``cast_dtypes`` puts back."""
    tensors = (*model.named_parameters(), *model.named_buffers(remove_duplicate=False))
    return {name: t.dtype for name, t in tensors if t.is_floating_point()}


def cast_dtypes(model, dtypes: dict[str, torch.dtype]) -> None:
    """Every parameter and buffer named in ``dtypes`` to its dtype there: into fp32 with
    ``dict.fromkeys(floating_dtypes(model), torch.float32)``, back with ``floating_dtypes``'s own
    record, taken before.

    Parameters are cast in place (``.data`` swapped: same objects, tied weights stay tied); every
    fp16 and bf16 value is exact in fp32, so a round trip through fp32 restores them bit for bit.
    Not ``model.to(dtype)``: that also casts what ``from_pretrained`` keeps in fp32 whatever the
    dtype, such as RoPE's ``inv_freq``, and a model so cast computes otherwise than its reload.
    """
    for name, p in model.named_parameters():
        if name in dtypes and p.dtype != dtypes[name]:
            p.data = p.data.to(dtypes[name])
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in dtypes and b.dtype != dtypes[name]:
            module, _, attr = name.rpartition(".")
            owner = model.get_submodule(module) if module else model
            owner._buffers[attr] = b.to(dtypes[name])
