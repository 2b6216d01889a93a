"""Notebook 09's comparison: block vs attention-only vs MLP-only pruning at equal parameter count.

How many halves hold the parameters of ``k`` blocks (``n_for_equal_params``), the three
models pruned that way (``equal_param_models``), and what each buys at inference: batch-1
latency and the KV cache it really fills (``speed_and_kv``, ``kv_cache_bytes``), relative to
the dense model (``relative_to``). Built on the unit interface, so it names no unit's code.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..efficiency import measure_generation
from ..families import count_params, get_blocks, unwrap
from ..models import load_model
from ..pipeline import prune_model
from ..units import get_unit

__all__ = ["n_for_equal_params", "equal_param_models", "kv_cache_bytes", "speed_and_kv", "relative_to"]


def n_for_equal_params(model, unit: str, n_blocks: int) -> int:
    """How many ``unit`` halves hold about as many parameters as ``n_blocks`` whole blocks.

    Raises when that many halves do not exist (attention halves are small: 20 % of the blocks'
    parameters is ~80 % of SmolLM2's attentions, 35 % is more than all of them).
    """
    if get_unit(unit).name == "block":
        return n_blocks
    n = round(n_blocks * get_unit("block").params(model) / get_unit(unit).params(model))
    total = len(get_blocks(model))
    if n >= total:
        raise ValueError(f"{n_blocks} blocks hold the parameters of {n} {unit} halves, but the model has only "
                         f"{total} (one must stay): no {unit}-only pruning matches that parameter count")
    return max(n, 1)


def equal_param_models(model_name: str, input_ids, n_blocks: int, criterion: str = "ppl",
                       units=("block", "attn", "mlp")) -> dict:
    """``{unit: (model, tokenizer, removed) or None}``: each unit pruned to ~``n_blocks`` blocks' parameters.

    ``None`` for a unit that cannot match that count (the error message is kept under ``"<unit>_why"``).
    Every unit is scored by the same ``criterion`` (``ppl``, ``sleb``, ``bi``, ``reverse``, ``random`` score all three).
    """
    out: dict = {}
    for unit in units:
        model, tokenizer = load_model(model_name)
        try:
            n = n_for_equal_params(model, unit, n_blocks)
        except ValueError as err:
            out[unit], out[f"{unit}_why"] = None, str(err)
            continue
        model, removed, _ = prune_model(model, input_ids, criterion, n, unit=unit, progress=False)
        out[unit] = (model, tokenizer, removed)
    return out


def speed_and_kv(models: dict, contexts=(128, 2048), new_tokens: int = 16, repeats: int = 2, progress: bool = True):
    """Batch-1 generation latency after a ``context``-token prompt, and the measured KV-cache bytes, per model.

    Models are interleaved per context (a slow spell of a shared machine hits all alike).
    Uses ``efficiency.measure_generation`` (warm-up, then ``repeats`` timed forced-length runs).
    """
    import pandas as pd

    rows = []
    for ctx in tqdm(list(contexts), desc="contexts", disable=not progress):
        for name, model in models.items():
            r = measure_generation(model, batch_size=1, prompt_len=ctx, new_tokens=new_tokens, warmup=1,
                                   repeats=repeats, prefill=True)
            rows.append({"model": name, "context": ctx, "latency_s": r["latency_s"], "prefill_s": r["prefill_s"],
                         "decode_tokens_per_s": r["decode_tokens_per_s"], "kv_cache_mb": kv_cache_bytes(model, ctx) / 2**20,
                         "params": count_params(model)})
    return pd.DataFrame(rows)


def relative_to(speed, baseline: str = "dense"):
    """``speed_and_kv`` rows with ``speedup`` (baseline latency / latency) and ``kv_vs_dense``
    (KV cache / the baseline's) added, each against ``baseline`` at the same context."""
    base = speed[speed.model == baseline].set_index("context")
    return speed.assign(speedup=speed.context.map(base.latency_s) / speed.latency_s,
                        kv_vs_dense=speed.kv_cache_mb / speed.context.map(base.kv_cache_mb))


@torch.no_grad()
def kv_cache_bytes(model, seq_len: int, batch_size: int = 1) -> int:
    """Bytes of keys and values the model's cache really holds after a ``seq_len``-token prefill (measured)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=unwrap(model).config)
    unwrap(model)(ids.to(device), cache=cache, use_cache=True, logits_to_keep=1)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))
