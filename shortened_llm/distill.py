"""Retraining beyond the paper: knowledge distillation from the dense model, and partial fine-tuning.

- ``distill`` (Minitron: Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice"):
  the pruned student learns the dense teacher's next-token distribution, forward
  KL(p_teacher^T || p_student^T) x T^2 at temperature T, optionally mixed with the LM loss
  (``alpha``), optionally plus a relative MSE between the output of each kept block and of
  the same original block of the teacher (``pruning.json`` says which one that is).
  The KL is computed over chunks of tokens, each chunk's gradient made in the forward
  (``_FusedKL``), so only ``kd_chunk x vocab`` logits live at a time: a 128k vocabulary at
  4 x 2048 tokens would otherwise hold two 4 GB float32 logit tensors.
  The teacher runs under ``no_grad`` in the student's dtype (or a lower one you pass).
  Full-weight (default) or LoRA (``lora=True``) student.
- ``partial_retrain`` (Lu et al. 2024, "Reassessing Layer Pruning in LLMs"): fully fine-tune
  only the last K blocks and the LM head on plain text; every other weight is frozen.

Both run on ``trainer.py``'s machinery (packed text blocks, the HF ``Trainer`` in
``<out>.checkpoints`` with resume, atomic publishing, ``loss_log.csv`` and ``training.json``),
so they run on one CPU and under ``torchrun``/``accelerate launch`` like CPT, and both
register in ``recovery.py``. Notebook 09's recovery table, which runs them side by side, is
``lessons.recovery_table``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .efficiency import track_peak_memory, weights_mb
from .families import count_params, get_blocks, hooks_removed, unwrap
from .models import load_model, save_model
from .presets import Preset
from .recovery import RecoveryMethod, register_recovery
from .trainer import (ADAPTER_DIR, RetrainResult, fingerprint, lora_config, packed_text_run, preset_settings, publish,
                      run_on_cpt_budget, save_adapter, save_trained, start_run, world_size)

__all__ = ["KDSettings", "distill", "partial_retrain", "kd_loss", "check_same_vocab"]


@dataclass
class KDSettings:
    """What the KD loss needs besides the batch (the teacher is held here, not as a submodule)."""

    teacher: nn.Module
    temperature: float = 1.0  # softens both distributions; the KL is scaled by T^2 (Hinton et al.)
    alpha: float = 0.0  # weight of the LM (cross-entropy) loss; 1 - alpha goes to the KL
    hidden_weight: float = 0.0  # weight of the per-block hidden-state MSE (0 = off)
    block_map: list[int] | None = None  # original block index of each student block
    chunk: int = 1024  # tokens per KL chunk


# ---- checks ---------------------------------------------------------------------------------

def check_same_vocab(student, teacher, tokenizer, teacher_tokenizer=None) -> None:
    """Refuse a teacher whose vocabulary differs: the KL compares distributions over the same ids."""
    s_v = unwrap(student).get_output_embeddings().weight.shape[0]
    t_v = unwrap(teacher).get_output_embeddings().weight.shape[0]
    if s_v != t_v:
        raise ValueError(f"teacher has {t_v} output logits, student {s_v}: knowledge distillation needs the same "
                         "vocabulary. Use the dense model the student was pruned from as the teacher.")
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        diff = len(set(teacher_tokenizer.get_vocab().items()) ^ set(tokenizer.get_vocab().items()))
        raise ValueError(f"teacher and student tokenizers differ ({diff} token/id pairs not shared): the same id "
                         "would mean different tokens. Use the dense model the student was pruned from as the teacher.")


def _block_map(student, teacher) -> list[int]:
    """Original (teacher) block index of each student block, from the student's pruning record."""
    record = getattr(student, "pruning", None) or getattr(unwrap(student), "pruning", None)
    if record is None:
        raise ValueError("hidden_loss needs to know which teacher block each student block was: the student has no "
                         "pruning record (model.pruning / pruning.json). Pass a model pruned by shortened_llm "
                         "(prune.remove_blocks or a dir written by `shortened-llm prune`), or hidden_loss=False.")
    kept = record.kept_blocks
    n_s, n_t = len(get_blocks(student)), len(get_blocks(teacher))
    if len(kept) != n_s or record.original_num_blocks != n_t:
        raise ValueError(f"the student's pruning record ({record.original_num_blocks} blocks, {len(kept)} kept) does "
                         f"not match student ({n_s} blocks) and teacher ({n_t} blocks): is this its dense model?")
    return kept


# ---- the loss -------------------------------------------------------------------------------

def _softcap(logits: torch.Tensor, config) -> torch.Tensor:
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _chunk_kl(h_s, h_t, head_s, head_t, config, temperature: float) -> torch.Tensor:
    """Summed KL(p_t || p_s) at temperature T over ``(n, d)`` hidden rows: ``(n, V)`` logits live only here."""
    s = _softcap(head_s(h_s), config).float() / temperature  # (n, V)
    with torch.no_grad():
        t = _softcap(head_t(h_t), config).float() / temperature  # (n, V)
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")


class _FusedKL(torch.autograd.Function):
    """Summed KL(p_t || p_s) at temperature T from hidden rows and the two heads' weights, its
    gradient computed chunk by chunk in the forward (the fused linear-cross-entropy idea).

    Per chunk of rows the student's logits ``s`` give ``p_s = softmax(s / T)``, and
    ``dKL/ds = (p_s - p_t) / T`` (times the softcap's ``1 - tanh^2`` where the family caps
    its logits); the chunk's gradients for the hidden rows and the head are two products with
    it, made at once, so only one ``(chunk, V)`` block lives at a time and nothing is recomputed
    in backward, which only scales them. Against checkpointing each chunk (``_chunk_kl``) that
    is 4 vocabulary-wide products instead of 6 and about half the elementwise passes.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, cap, temperature, chunk):
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        grad_h = torch.empty_like(h_s)
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for i in range(0, h_s.shape[0], chunk):
            rows = h_s[i : i + chunk]
            s = (rows @ w_s.t()).float()  # (n, V), under the run's autocast like the model's own head
            with torch.no_grad():
                t = (h_t[i : i + chunk] @ w_t.t()).float()
            if cap:
                s, t = torch.tanh(s / cap), torch.tanh(t / cap) * cap
                squash, s = 1 - s.square(), s * cap
            if temperature != 1:  # a pass over (n, V) each, saved at the usual T = 1
                s, t = s / temperature, t / temperature
            log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
            p_t = log_pt.exp()
            total += (p_t * (log_pt - log_ps)).sum()
            g = log_ps.exp_().sub_(p_t)  # dKL/ds, times 1/T
            if temperature != 1:
                g /= temperature
            if cap:
                g *= squash
            grad_h[i : i + chunk] = (g.to(w_s.dtype) @ w_s).to(h_s.dtype)
            if grad_w is not None:
                grad_w += (g.t() @ rows.to(g.dtype)).float()
        ctx.save_for_backward(grad_h, grad_w)  # grad_w None: the head is frozen (a LoRA student)
        ctx.w_dtype = w_s.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out, None if grad_w is None else (grad_w * grad_out).to(ctx.w_dtype),
                None, None, None, None, None)


def _plain_weight(head: nn.Module):
    """The weight of a bias-free ``nn.Linear`` head (every family's LM head), else None."""
    return head.weight if type(head) is nn.Linear and head.bias is None else None


def kd_loss(h_s: torch.Tensor, h_t: torch.Tensor, head_s: nn.Module, head_t: nn.Module, valid: torch.Tensor,
            config=None, temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """Mean over ``valid`` tokens of T^2 x KL(teacher || student), from final hidden states ``(B, T, d)``.

    Chunked over tokens: only one ``(chunk, V)`` block of logits lives at a time, whatever the
    vocabulary. Bias-free linear heads (every family's) take the fused path (``_FusedKL``);
    any other head (a LoRA-wrapped one) is run chunk by chunk under activation checkpointing.
    """
    from torch.utils.checkpoint import checkpoint

    h_s, h_t = h_s[valid], h_t[valid].to(h_s.device)  # (N, d)
    w_s, w_t = _plain_weight(head_s), _plain_weight(head_t)
    if w_s is not None and w_t is not None:
        cap = getattr(config, "final_logit_softcapping", None)
        return _FusedKL.apply(h_s, w_s, h_t, w_t.detach(), cap, temperature, chunk) * temperature**2 / max(h_s.shape[0], 1)
    total = h_s.new_zeros((), dtype=torch.float32)
    for i in range(0, h_s.shape[0], chunk):
        total = total + checkpoint(_chunk_kl, h_s[i : i + chunk], h_t[i : i + chunk], head_s, head_t, config,
                                   temperature, use_reentrant=False)
    return total * temperature**2 / max(h_s.shape[0], 1)


def _lm_ce(h_s, head_s, labels, config, chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy, chunked the same way (``h_s`` already aligned with ``labels``)."""
    from torch.utils.checkpoint import checkpoint

    def ce(h, y):
        return F.cross_entropy(_softcap(head_s(h), config).float(), y, reduction="sum")

    total = h_s.new_zeros((), dtype=torch.float32)
    for i in range(0, h_s.shape[0], chunk):
        total = total + checkpoint(ce, h_s[i : i + chunk], labels[i : i + chunk], use_reentrant=False)
    return total / max(h_s.shape[0], 1)


def _kd_trainer_class():
    from transformers import Trainer

    class KDTrainer(Trainer):
        """A ``Trainer`` whose loss is the KD loss; everything else (DDP, checkpoints, resume) is stock."""

        def __init__(self, *args, kd: KDSettings, **kwargs):
            super().__init__(*args, **kwargs)
            self.kd = kd
            self.kd.teacher.eval().requires_grad_(False)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            kd = self.kd
            ids, labels = inputs["input_ids"], inputs["labels"]
            mask = inputs.get("attention_mask")
            student = unwrap(self.accelerator.unwrap_model(model))
            teacher = kd.teacher
            if next(teacher.parameters()).device != ids.device:
                teacher.to(ids.device)
            captured_s: list[torch.Tensor] = []
            hooks = [b.register_forward_hook(lambda m, a, o: captured_s.append(o[0] if isinstance(o, tuple) else o))
                     for b in get_blocks(student)] if kd.hidden_weight else []
            with hooks_removed(hooks):  # through the (DDP-wrapped) model, so gradient sync works; last logits only
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1,
                            use_cache=False)
            captured_t: dict[int, torch.Tensor] = {}
            wanted = set(kd.block_map or [])
            t_blocks = get_blocks(teacher)
            t_hooks = [t_blocks[i].register_forward_hook(
                lambda m, a, o, i=i: captured_t.__setitem__(i, o[0] if isinstance(o, tuple) else o))
                for i in wanted] if kd.hidden_weight else []
            with hooks_removed(t_hooks), torch.no_grad():
                t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1,
                                use_cache=False)
            # position t predicts token t + 1: keep positions whose next label is real
            valid = torch.zeros_like(labels, dtype=torch.bool)
            valid[:, :-1] = labels[:, 1:] != -100
            h_s, h_t = out.hidden_states[-1], t_out.hidden_states[-1]  # (B, T, d), after the final norm
            head_s, head_t = student.get_output_embeddings(), teacher.get_output_embeddings()
            config = student.config
            # the heads run here, outside the model's forward: under the run's autocast too (a no-op in fp32),
            # or the student's vocabulary projection, the largest product of a small model, stays fp32
            with self.accelerator.autocast():
                loss = (1 - kd.alpha) * kd_loss(h_s, h_t, head_s, head_t, valid, config, kd.temperature, kd.chunk)
                ce = _lm_ce(h_s[valid], head_s, labels[:, 1:][valid[:, :-1]], config, kd.chunk) if kd.alpha else None
            parts = {"kd": loss.detach()}
            if kd.alpha:
                loss = loss + kd.alpha * ce
                parts["lm"] = ce.detach()
            if kd.hidden_weight:
                mse = torch.stack([F.mse_loss(hs.float(), captured_t[t].float().to(hs.device)) /
                                   captured_t[t].float().pow(2).mean().clamp_min(1e-8)
                                   for hs, t in zip(captured_s, kd.block_map)]).mean()
                loss = loss + kd.hidden_weight * mse
                parts["hidden"] = mse.detach()
            return (loss, out) if return_outputs else loss

    return KDTrainer


# ---- shared setup ---------------------------------------------------------------------------

def _memory_fields(memory: dict) -> dict:
    """``track_peak_memory``'s numbers as ``training.json`` keys (``memory_peak_mb``, ...), MB to 2 decimals."""
    return {f"memory_{k}": (round(v, 2) if isinstance(v, float) else v) for k, v in memory.items()}


def _resolve_teacher(teacher, student, teacher_dtype):
    """The teacher object, loaded if a name, in the student's dtype (or lower), frozen."""
    teacher_tok = None
    if isinstance(teacher, (str, os.PathLike)):
        teacher, teacher_tok = load_model(teacher, device="cpu")
    s_dtype = next(student.parameters()).dtype
    dtype = teacher_dtype or s_dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if torch.finfo(dtype).bits > torch.finfo(s_dtype).bits:
        raise ValueError(f"teacher_dtype={dtype} is wider than the student's {s_dtype}: the teacher runs in the "
                         "student's dtype or lower (it only needs forward passes)")
    teacher = teacher.to(dtype=dtype).eval().requires_grad_(False)
    return teacher, teacher_tok


# ---- public API -----------------------------------------------------------------------------

def distill(student, teacher, tokenizer=None, dataset="c4", out_dir: str | os.PathLike = "retrained/kd",
            preset: str | Preset = "smoke", max_steps: int | None = None, temperature: float = 1.0,
            alpha: float = 0.0, hidden_loss: bool | float = False, lora: bool = False, teacher_dtype=None,
            kd_chunk: int = 1024, seed: int | None = None, overwrite: bool = False, resume: bool = True,
            keep_checkpoints: bool = False, progress: bool = True, callbacks=(), **overrides) -> RetrainResult:
    """Knowledge distillation of ``student`` from ``teacher`` on packed text; returns the trained model.

    ``student`` / ``teacher``: model objects or names / dirs. ``dataset``: a name for
    ``load_texts`` or a list of texts. Budgets come from the preset's ``cpt_*`` fields (global
    batch ``cpt_batch`` of ``cpt_block_size``-token blocks, lr ``cpt_lr``, cosine schedule);
    ``max_steps`` defaults to ``preset.cpt_steps``. ``hidden_loss`` = True (weight 1) or a
    weight adds the per-block hidden-state MSE. ``lora=True`` trains a LoRA adapter (the
    preset's ``lora_*`` shape) instead of every weight; the merged model is returned and the
    adapter saved under ``adapter/``. The output dir holds a plain HF model, ``pruning.json``,
    ``loss_log.csv`` and ``training.json`` (with peak memory and teacher/student weight sizes).
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1]: the share of the LM loss (the KL gets 1 - alpha)")
    if kd_chunk < 1:
        raise ValueError(f"kd_chunk={kd_chunk} must be >= 1 token")
    preset, out_dir, student, tokenizer = start_run(student, tokenizer, out_dir, preset, overwrite, overrides)
    teacher, teacher_tok = _resolve_teacher(teacher, student, teacher_dtype)
    check_same_vocab(student, teacher, tokenizer, teacher_tok)
    hidden_weight = float(hidden_loss) if not isinstance(hidden_loss, bool) else (1.0 if hidden_loss else 0.0)
    block_map = _block_map(student, teacher) if hidden_weight else None
    seed, train_rows, val_rows, record = packed_text_run(student, tokenizer, dataset, preset, seed)
    base_print = fingerprint(student)
    if lora:
        from peft import get_peft_model

        model = get_peft_model(student, lora_config(preset))
    else:
        model = student.train().requires_grad_(True)
    kd = KDSettings(teacher, temperature, alpha, hidden_weight, block_map, kd_chunk)
    with track_peak_memory() as memory:
        trainer, seconds, work = run_on_cpt_budget(
            model, tokenizer, train_rows, val_rows, preset, out_dir=out_dir, max_steps=max_steps,
            seed=seed, resume=resume, progress=progress, callbacks=callbacks, keep_checkpoints=keep_checkpoints,
            trainer_cls=functools.partial(_kd_trainer_class(), kd=kd))
    staging = work / "final"
    if lora:
        trained = model.merge_and_unload().requires_grad_(True)
        if trainer.is_world_process_zero():
            save_model(trained, tokenizer, staging, overwrite=True)  # writes (and seals) pruning.json
            save_adapter(model, staging / ADAPTER_DIR, base_print)
    else:
        save_trained(trainer, tokenizer, staging, record)
        trained = trainer.model
    if record is not None:
        trained.pruning = record
    trained.eval()
    info = {"method": "kd-lora" if lora else "kd", "steps": trainer.state.global_step, "seconds": round(seconds, 2),
            "seed": seed, "processes": world_size(), "train_blocks": len(train_rows), "val_blocks": len(val_rows),
            "tokens_per_step": preset.cpt_batch * preset.cpt_block_size, "temperature": temperature, "alpha": alpha,
            "hidden_weight": hidden_weight, "kd_chunk": kd_chunk, "teacher_dtype": str(next(teacher.parameters()).dtype),
            "student_weights_mb": round(weights_mb(trained), 2), "teacher_weights_mb": round(weights_mb(teacher), 2),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "params": count_params(trained), "base": base_print, "preset": preset.name,
            **_memory_fields(memory), **preset_settings(preset, "cpt_")}
    publish(trainer, work, out_dir, overwrite, info, keep_checkpoints)
    return RetrainResult(trained, tokenizer, out_dir, info["method"], trainer.state.global_step, seconds,
                         list(trainer.state.log_history))


def partial_retrain(model, tokenizer=None, dataset="c4", out_dir: str | os.PathLike = "retrained/partial",
                    preset: str | Preset = "smoke", last_k: int = 3, max_steps: int | None = None,
                    seed: int | None = None, overwrite: bool = False, resume: bool = True,
                    keep_checkpoints: bool = False, progress: bool = True, callbacks=(), **overrides) -> RetrainResult:
    """Fully fine-tune only the last ``last_k`` blocks, the final norm and the LM head; freeze the rest.

    Lu et al. (2024) found this partial-layer fine-tuning recovers a depth-pruned model better
    than LoRA at lower cost. With tied embeddings the LM head *is* the input embedding, so it
    trains too. Same data, budgets and outputs as ``distill`` (LM loss instead of KL).
    """
    preset, out_dir, model, tokenizer = start_run(model, tokenizer, out_dir, preset, overwrite, overrides)
    n = len(get_blocks(model))
    if not isinstance(last_k, int) or not 1 <= last_k <= n:
        raise ValueError(f"last_k={last_k!r} must be an int in 1..{n} (the model has {n} blocks)")
    seed, train_rows, val_rows, record = packed_text_run(model, tokenizer, dataset, preset, seed)
    inner = unwrap(model)
    model.train().requires_grad_(False)
    trainable = [*get_blocks(inner)[n - last_k:], inner.get_output_embeddings()]
    final_norm = getattr(getattr(inner, "model", None), "norm", None)
    if final_norm is not None:
        trainable.append(final_norm)
    for module in trainable:
        module.requires_grad_(True)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with track_peak_memory() as memory:
        trainer, seconds, work = run_on_cpt_budget(
            model, tokenizer, train_rows, val_rows, preset, out_dir=out_dir, max_steps=max_steps,
            seed=seed, resume=resume, progress=progress, callbacks=callbacks, keep_checkpoints=keep_checkpoints)
    save_trained(trainer, tokenizer, work / "final", record)
    trained = trainer.model
    trained.requires_grad_(True).eval()
    if record is not None:
        trained.pruning = record
    info = {"method": "partial", "last_k": last_k, "steps": trainer.state.global_step, "seconds": round(seconds, 2),
            "seed": seed, "processes": world_size(), "train_blocks": len(train_rows), "val_blocks": len(val_rows),
            "tokens_per_step": preset.cpt_batch * preset.cpt_block_size, "trainable_params": n_trainable,
            "params": count_params(trained), "base": fingerprint(trained), "preset": preset.name,
            **_memory_fields(memory), **preset_settings(preset, "cpt_")}
    publish(trainer, work, out_dir, overwrite, info, keep_checkpoints)
    return RetrainResult(trained, tokenizer, out_dir, "partial", trainer.state.global_step, seconds,
                         list(trainer.state.log_history))


register_recovery(RecoveryMethod(
    "kd", "knowledge distillation from the dense teacher (Minitron): KL on packed text, full-weight or LoRA",
    distill, teacher="the dense model the student was pruned from", data="c4", data_keyword="dataset", steps_field="cpt_steps",
    cli_options=("preset", "seed", "resume", "max_steps", "temperature", "alpha", "hidden_loss", "lora")))
register_recovery(RecoveryMethod(
    "partial", "fine-tune only the last K blocks and the LM head on packed text (Lu et al. 2024)",
    partial_retrain, data="c4", data_keyword="dataset", steps_field="cpt_steps", cli_options=("preset", "seed", "resume", "max_steps", "last_k")))
