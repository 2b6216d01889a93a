"""The paper's official numbers (see README.md here), shipped so every checkout can compare with them."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["REFERENCE_DIR", "TABLES", "reference_table"]

REFERENCE_DIR = Path(__file__).resolve().parent
# the paper's official release (also in the shared pack), then Sheared-LLaMA's published averages (notebook 10)
TABLES = ("official_results", "official_block_orders", "official_block_ppl", "sheared_llama")


def reference_table(name: str) -> pd.DataFrame:
    """One of ``TABLES`` as a DataFrame."""
    if name not in TABLES:
        raise ValueError(f"unknown reference table {name!r}; available: {', '.join(TABLES)}")
    return pd.read_csv(REFERENCE_DIR / f"{name}.csv")
