"""shortened-llm: depth pruning of LLMs after Kim et al. 2024 ("Shortened LLaMA", arXiv 2402.02834)."""
from .data import calibration_batches, load_records, load_texts
from .evaluate import perplexity
from .importance import block_importance, blocks_to_remove
from .models import DEFAULT_MODEL, load_model, save_model
from .prune import remove_blocks
from .reference import reference_table
from . import subblock  # noqa: F401  (registers load_model's loader of sub-block dirs)
from .zeroshot import PAPER_TASKS, zero_shot

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MODEL",
    "load_model",
    "save_model",
    "calibration_batches",
    "load_texts",
    "load_records",
    "block_importance",
    "blocks_to_remove",
    "remove_blocks",
    "perplexity",
    "zero_shot",
    "PAPER_TASKS",
    "reference_table",
]
