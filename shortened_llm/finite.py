"""NaN and inf caught where they appear: in block scores and in training losses.

An fp16/bf16 overflow gives NaN or inf. Ranked, a NaN sorts anywhere (``sorted`` is not even
consistent with it) and removes the wrong blocks; trained on, it turns every weight into NaN
and the run "finishes". Both are refused here with the criterion or the step named and the
fix (``--dtype float32``). Imports only ``errors``: scoring and training both use it, and
``import shortened_llm`` (which scores) must not pay for ``transformers``' training stack (its
``trainer_utils`` imports peft: about 4 s), so the Trainer callback that applies
``check_finite_logs`` lives in ``trainer.py``.
"""
from __future__ import annotations

import math

import torch

from .errors import NonFiniteError

__all__ = ["check_finite_scores", "check_finite_logs"]

FIX = "run it in float32 (CLI: --dtype float32; SHORTENED_LLM_DTYPE=float32): fp16/bf16 overflowed"


def check_finite_scores(scores: torch.Tensor, criterion: str, alive) -> torch.Tensor:
    """``scores`` unchanged if every live unit (``alive``) has a finite score and none is NaN.

    Units already removed carry +inf on purpose (``to_remove`` never picks them), so +inf is
    refused only where the unit is still there.
    """
    alive = set(alive)
    bad = [i for i, s in enumerate(scores.tolist()) if math.isnan(s) or (i in alive and not math.isfinite(s))]
    if bad:
        values = ", ".join(f"{i}: {scores[i].item()}" for i in bad[:6])
        raise NonFiniteError(f"criterion {criterion!r} scored blocks {bad} as NaN or inf ({values}), so no ranking "
                             f"can use them", FIX)
    return scores


def check_finite_logs(logs: dict | None, step: int) -> None:
    """Refuse a training log whose loss, validation loss or gradient norm is NaN or inf, naming the step.

    Called on every logged step (``trainer.non_finite_loss_stop``); the error propagates out of
    ``Trainer.train`` before the next checkpoint (losses are logged every step, checkpoints after
    the log), so no checkpoint or published model ever holds the NaN weights.
    """
    for key in ("loss", "eval_loss", "grad_norm"):
        value = (logs or {}).get(key)
        if value is not None and not math.isfinite(float(value)):
            raise NonFiniteError(f"training {key} is {value} at step {step}, so the weights are "
                                 "no longer usable; nothing was saved from this step on", FIX)
