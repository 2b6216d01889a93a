"""The dtype names the package accepts (``--dtype``, ``SHORTENED_LLM_DTYPE``, ``Preset.dtype``) and their parsing.

Ground floor: ``precision`` (which dtype to use) and ``presets`` (which validates its field)
both read names through here, so neither imports the other for it.
"""
from __future__ import annotations

import torch

from .errors import unknown_name

__all__ = ["DTYPES", "ALIASES", "dtype_name", "parse_dtype"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
                           "half": "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16 -> "bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(value, what: str = "dtype") -> torch.dtype | None:
    """A ``torch.dtype`` from a name, an alias or a dtype; ``None`` for ``"auto"``.

    ``what`` names the argument in the error (``--dtype``, ``SHORTENED_LLM_DTYPE``, ``Preset.dtype``).
    """
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(f"{what}={value} is not a floating dtype a model can run in: use one of "
                             f"{', '.join(DTYPES)}")
        return value
    text = str(value).strip().lower().removeprefix("torch.")
    if text == "auto":
        return None
    if text in DTYPES or text in ALIASES:
        return DTYPES[ALIASES.get(text, text)]
    names = ["auto", *DTYPES, *ALIASES]
    raise unknown_name(what, value, names)
