"""ReplaceMe: recover a depth-pruned model without training, by one linear map per removed span.

After Shopkhoev et al. 2025 (arXiv 2505.02819). A block adds its MLP's output ``M`` to the
residual stream: block ``i`` returns ``h_i = Y_i + M_i``, where ``Y_i`` is the stream after
its attention. When blocks ``i+1 .. j`` are removed, the stream should have reached ``L_j``,
the output of block ``j``, but it stops at ``h_i``. ReplaceMe looks for a ``d x d`` matrix
``T`` such that

    Y_i + M_i T  ~=  L_j,     i.e.   T* = argmin_T || M_i T - (L_j - Y_i) ||^2
                                     = (M^T M + lambda I)^{-1} M^T (L_j - Y_i),

over calibration tokens of the dense model (the teacher). ``M_i = a W^T`` is the output of
block ``i``'s last MLP projection (``down_proj``: ``W`` is ``d x f``), so ``M_i T = a (T^T W)^T``:
``T`` folds into that projection as ``W <- T^T W`` (and a bias ``b <- T^T b``). The pruned
model gains no parameter and stays a plain Hugging Face model.

Only the ``d x d`` sums ``M^T M`` and ``M^T (L - Y)`` are accumulated, in float64, so the fit
of a 7B model needs O(d^2) memory per span, whatever the number of tokens. The paper's other
objective, the cosine distance between ``Y + M T`` and ``L``, has no closed form: it is
minimised by Adam from the least-squares ``T``, on activations kept in memory
(O(tokens x d)).

A span that starts at block 0 has no block before it; folding ``T`` into the embedding would
also change a tied LM head, so such spans are refused with the reason.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import get_path, unwrap, family_of, get_blocks
from .recovery import RecoveryMethod, register_recovery
from .trainer import RetrainResult

__all__ = ["OBJECTIVES", "SpanFit", "check_teacher", "contiguous_spans", "fit_replaceme", "fold_into_model", "replaceme"]

OBJECTIVES = ("lstsq", "cosine")
# The recipe's ridge (a share of mean diag(M^T M)): on the embedded model, 20 % pruned by the PPL
# criterion (three spans), WikiText-2 PPL 122.8 -> 121.8 at 128 x 128 calibration tokens and
# 139.1 -> 131.9 at 32 x 128 (0 = the paper's plain least squares; benchmarks/bench_replaceme.py).
DEFAULT_RIDGE = 0.1
# Calibration samples of 128 tokens: 256 gave 120.4 (-10.4 % against plain removal's 134.5) in
# 31.5 s end to end on two idle cores, 128 gave 121.8 in 19 s, 32 gave 131.9.
DEFAULT_SAMPLES = 256


@dataclass
class SpanFit:
    """The map of one removed span: ``T`` folds into block ``before``'s MLP output projection."""

    span: tuple[int, int]  # first and last removed block, original indices
    before: int  # original index of the block that takes T
    transform: torch.Tensor  # (d, d), float64
    tokens: int
    ridge: float  # the lambda used (0 for a plain least-squares solve)
    residual_before: float  # mean squared ||L - h_i|| per token: plain removal
    residual_after: float  # mean squared ||L - (Y + M T)|| per token

    def as_json(self) -> dict:
        return {"span": list(self.span), "before": self.before, "tokens": self.tokens, "ridge": self.ridge,
                "residual_before": self.residual_before, "residual_after": self.residual_after}


def contiguous_spans(removed: list[int]) -> list[tuple[int, int]]:
    """``[4, 13, 14, 16, 17, 18] -> [(4, 4), (13, 14), (16, 18)]``."""
    spans: list[list[int]] = []
    for b in sorted(removed):
        if spans and b == spans[-1][1] + 1:
            spans[-1][1] = b
        else:
            spans.append([b, b])
    return [tuple(s) for s in spans]


def _mlp_out(model: nn.Module, block: nn.Module, where: str) -> nn.Linear:
    family = family_of(model)
    if family.mlp_out is None:
        raise ValueError(f"ReplaceMe needs a linear layer that adds the MLP's output to the residual stream; in "
                         f"{model.config.model_type!r} a norm comes between (post_feedforward_layernorm), so a "
                         f"linear map cannot be folded into {where}")
    if getattr(model.config, "do_layer_norm_before", True) is False:
        raise ValueError(f"ReplaceMe needs a pre-norm block; this {model.config.model_type!r} normalises after the "
                         "residual add (do_layer_norm_before=False), so a linear map cannot be folded into its fc2")
    layer = get_path(block, family.mlp_out)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{family.mlp_out!r} of {where} is a {type(layer).__name__}, not nn.Linear: "
                        f"FAMILIES[{model.config.model_type!r}].mlp_out does not match this transformers version")
    return layer


@torch.no_grad()
def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a teacher the pruned ``student`` was not cut from.

    Every kept block's attention weights must be those of the teacher's block with the same
    original index (``pruning.json``), up to what training may have changed: a relative
    difference above 0.5 means another base model (two random inits differ by about 1.4).
    """
    _check_pair(teacher, getattr(student, "pruning", None))
    family = family_of(teacher)
    far = []
    for new, orig in enumerate(student.pruning.kept_blocks):
        mine = next(get_path(get_blocks(student)[new], family.attn).parameters()).float()
        theirs = next(get_path(get_blocks(teacher)[orig], family.attn).parameters()).float()
        if mine.shape != theirs.shape:
            raise ValueError(f"block {new} of the pruned model ({tuple(mine.shape)}) and block {orig} of the teacher "
                             f"({tuple(theirs.shape)}) differ in shape: pass the dense model it was pruned from")
        if (mine - theirs).norm() > 0.5 * theirs.norm():
            far.append(orig)
    if far:
        raise ValueError(f"the pruned model's blocks from original blocks {far} do not match the teacher's: it was cut "
                         "from another model; pass the dense model it was pruned from")


def _check_pair(teacher: nn.Module, record) -> list[tuple[int, int]]:
    if record is None:
        raise ValueError("ReplaceMe needs to know which blocks were removed: pass a model pruned by shortened_llm "
                         "(model.pruning, or a directory with pruning.json)")
    n_teacher = len(get_blocks(teacher))
    if n_teacher != record.original_num_blocks:
        raise ValueError(f"the teacher has {n_teacher} blocks but the pruned model was cut from one with "
                         f"{record.original_num_blocks} (pruning.json): pass the dense model it was pruned from")
    spans = contiguous_spans(record.removed_blocks)
    if spans and spans[0][0] == 0:
        raise ValueError(f"removed span {spans[0]} starts at block 0: no block before it can take the map (folding it "
                         "into the embedding would also change a tied LM head); prune without block 0")
    return spans


class _EnoughActivations(Exception):
    """Raised by a hook after the last block a fit needs: the later blocks and the LM head are never run."""


def _raise(error: Exception):
    raise error


@torch.no_grad()
def _activations(teacher, input_ids, spans, batch_size, progress, keep: bool):
    """Per span: the normal-equation sums (and, with ``keep``, the activations) over ``input_ids``.

    All from one pass of the dense teacher, the same ``Y``, ``M`` and ``L`` for every span.
    Fitting span after span on the pruned model with the earlier maps folded in was tried on
    the embedded model (20 %, PPL criterion, 128 x 128 tokens): WikiText-2 PPL 124.9 vs 122.7
    here without ridge, 121.3 vs 121.8 with ridge 0.1, at 3-5x the time. Not worth it.
    """
    blocks = get_blocks(teacher)
    d = teacher.config.hidden_size
    wanted = {i for s, e in spans for i in (s - 1, e)}
    outputs: dict[int, torch.Tensor] = {}
    mlp_outputs: dict[int, torch.Tensor] = {}
    hooks = []
    for i in wanted:
        hooks.append(blocks[i].register_forward_hook(
            lambda m, a, out, i=i: outputs.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach())))
    for s, _ in spans:
        layer = _mlp_out(teacher, blocks[s - 1], f"block {s - 1}")
        hooks.append(layer.register_forward_hook(lambda m, a, out, i=s - 1: mlp_outputs.__setitem__(i, out.detach())))
    last = max(e for _, e in spans)  # nothing after this block is needed: stop the forward there
    hooks.append(blocks[last].register_forward_hook(lambda m, a, out: _raise(_EnoughActivations())))
    sums = {span: {"MtM": torch.zeros(d, d, dtype=torch.float64), "MtR": torch.zeros(d, d, dtype=torch.float64),
                   "before": 0.0, "tokens": 0, "kept": []} for span in spans}
    device = next(teacher.parameters()).device
    try:
        batches = input_ids.split(batch_size)
        for batch in tqdm(batches, desc="ReplaceMe activations", unit="batch", disable=not progress):
            with contextlib.suppress(_EnoughActivations):
                teacher(input_ids=batch.to(device), use_cache=False)
            for span in spans:
                s, e = span
                M = mlp_outputs[s - 1].reshape(-1, d).double().cpu()
                h = outputs[s - 1].reshape(-1, d).double().cpu()
                L = outputs[e].reshape(-1, d).double().cpu()
                R = L - h + M  # L - Y, with Y = h - M
                acc = sums[span]
                acc["MtM"] += M.T @ M
                acc["MtR"] += M.T @ R
                acc["before"] += ((L - h) ** 2).sum().item()
                acc["tokens"] += M.shape[0]
                if keep:
                    acc["kept"].append((M.float(), (h - M).float(), L.float()))
    finally:
        for hook in hooks:
            hook.remove()
    return sums


def _solve(MtM: torch.Tensor, MtR: torch.Tensor, ridge: float, span) -> tuple[torch.Tensor, float]:
    """``(M^T M + lambda I)^{-1} M^T R``; lambda is relative to mean(diag(M^T M)). Singular or NaN: ridge, with a warning."""
    d = MtM.shape[0]
    scale = MtM.diagonal().mean().item()
    if not (math.isfinite(scale) and torch.isfinite(MtR).all()):
        raise FloatingPointError(f"span {span}: the calibration activations hold NaN or inf (an overflow in the "
                                 "teacher's dtype?): load the teacher in float32")
    eye = torch.eye(d, dtype=torch.float64)
    lam = ridge * scale
    T, info = torch.linalg.solve_ex(MtM + lam * eye, MtR)
    if info.item() != 0 or not torch.isfinite(T).all():
        lam = max(lam, 1e-6 * scale)
        warnings.warn(f"span {span}: the least-squares system is singular; solved with ridge lambda = {lam:.3g} "
                      f"(1e-6 x mean diag(M^T M))", RuntimeWarning, stacklevel=3)
        T = torch.linalg.solve(MtM + lam * eye, MtR)
    return T, lam


def _cosine_refine(T: torch.Tensor, kept, steps: int, lr: float) -> torch.Tensor:
    """Adam on the mean cosine distance between ``Y + M T`` and ``L``, from the least-squares ``T``."""
    M = torch.cat([k[0] for k in kept])
    Y = torch.cat([k[1] for k in kept])
    L = torch.cat([k[2] for k in kept])
    T = T.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([T], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = 1 - torch.nn.functional.cosine_similarity(Y + M @ T, L, dim=-1).mean()
            loss.backward()
            opt.step()
    return T.detach().double()


def fit_replaceme(teacher: nn.Module, record, input_ids: torch.Tensor, objective: str = "lstsq", ridge: float = 0.0,
                  batch_size: int = 8, cosine_steps: int = 200, cosine_lr: float = 1e-4,
                  progress: bool = True) -> list[SpanFit]:
    """One ``T`` per contiguous removed span of ``record`` (a ``PruningRecord``), fitted on the teacher's activations.

    ``input_ids`` is ``(n, seq_len)`` calibration ids; at least ``hidden_size`` tokens are
    needed for a ``d x d`` fit (fewer leave ``M^T M`` singular).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: use one of {', '.join(OBJECTIVES)}")
    if not ridge >= 0:
        raise ValueError(f"ridge={ridge} must be >= 0 (a share of mean diag(M^T M))")
    spans = _check_pair(teacher, record)
    d = teacher.config.hidden_size
    if input_ids.numel() < d:
        raise ValueError(f"{input_ids.numel()} calibration tokens are too few for a {d} x {d} fit: "
                         f"use at least {d} (e.g. {math.ceil(d / input_ids.shape[1])} samples of {input_ids.shape[1]})")
    sums = _activations(teacher, input_ids, spans, batch_size, progress, keep=objective == "cosine")
    fits = []
    for span in spans:
        acc = sums[span]
        T, lam = _solve(acc["MtM"], acc["MtR"], ridge, span)
        if objective == "cosine":
            T = _cosine_refine(T, acc["kept"], cosine_steps, cosine_lr)
        # ||R - M T||^2 summed = tr(R^T R) - 2 tr(T^T M^T R) + tr(T^T M^T M T); R^T R is not kept, so
        # report it against plain removal through ||L - h||^2 = ||R - M||^2 (T = I).
        identity = torch.eye(d, dtype=torch.float64)

        def excess(X):  # sum ||R - M X||^2 - sum ||R - M||^2, from the kept sums only
            return (-2 * (X * acc["MtR"]).sum() + (X * (acc["MtM"] @ X)).sum()
                    + 2 * (identity * acc["MtR"]).sum() - (identity * (acc["MtM"] @ identity)).sum()).item()

        n = acc["tokens"]
        fits.append(SpanFit(span=span, before=span[0] - 1, transform=T, tokens=n, ridge=lam,
                            residual_before=acc["before"] / n, residual_after=(acc["before"] + excess(T)) / n))
    return fits


@torch.no_grad()
def fold_into_model(student: nn.Module, fits: list[SpanFit]) -> None:
    """``W <- T^T W`` (and ``b <- T^T b``) in each span's block-before of the pruned ``student``."""
    record = student.pruning
    new_index = {orig: new for new, orig in enumerate(record.kept_blocks)}
    blocks = get_blocks(student)
    for fit in fits:
        layer = _mlp_out(student, blocks[new_index[fit.before]], f"block {fit.before}")
        T = fit.transform.to(layer.weight.device)
        layer.weight.copy_((T.T @ layer.weight.double()).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_((T.T @ layer.bias.double()).to(layer.bias.dtype))


def replaceme(model, teacher, tokenizer=None, out_dir: str | Path | None = None, n_samples: int = DEFAULT_SAMPLES,
              seq_len: int = 128, dataset: str = "bookcorpus", objective: str = "lstsq", ridge: float = DEFAULT_RIDGE,
              seed: int = 1234, batch_size: int = 8, overwrite: bool = False, progress: bool = True):
    """Fit and fold ReplaceMe into a pruned model; save it to ``out_dir`` when given. Returns a ``RetrainResult``.

    ``model`` and ``teacher`` are models or names/dirs for ``load_model``. The saved directory
    is a plain HF model with the pruned model's parameter count; its ``pruning.json`` gains a
    ``recovery`` entry with the method, objective, calibration and the per-span fits.
    """
    from .data import calibration_batches
    from .models import load_model, save_model

    start = time.perf_counter()
    if isinstance(model, (str, Path)):
        model, tokenizer = load_model(model)
    if isinstance(teacher, (str, Path)):
        teacher, _ = load_model(teacher)
    student = unwrap(model)
    if tokenizer is None:
        raise ValueError("pass the tokenizer with a model object (it draws the calibration samples)")
    record = getattr(student, "pruning", None)
    teacher = unwrap(teacher).eval()
    check_teacher(student, teacher)
    ids = calibration_batches(tokenizer, n_samples, seq_len, seed, dataset, bos_every=family_of(teacher).bos_every)
    fits = fit_replaceme(teacher, record, ids, objective=objective, ridge=ridge, batch_size=batch_size,
                         progress=progress)
    fold_into_model(student, fits)
    record.recovery = {"method": "replaceme", "objective": objective, "ridge": ridge,
                       "calibration": {"dataset": dataset, "n_samples": n_samples, "seq_len": seq_len, "seed": seed},
                       "spans": [f.as_json() for f in fits]}
    seconds = time.perf_counter() - start
    if out_dir is not None:
        save_model(student, tokenizer, out_dir, overwrite=overwrite)
    return RetrainResult(model=student, tokenizer=tokenizer, out_dir=Path(out_dir) if out_dir else None,
                         method="replaceme", steps=0, seconds=seconds,
                         log=[{"span": f.span, "residual_before": f.residual_before,
                               "residual_after": f.residual_after} for f in fits])


register_recovery(RecoveryMethod(
    "replaceme", "training-free: one least-squares linear map per removed span, folded into a kept block",
    replaceme, teacher="the dense model the pruned one was cut from", data="bookcorpus", data_keyword="dataset",
    trains=False, cli_options=("seed", "n_samples", "objective", "ridge")))
