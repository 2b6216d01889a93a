"""The training machinery every retraining method builds on: one Hugging Face ``Trainer`` run, made safe.

A method (``retrain.py``: LoRA, CPT; ``distill.py``: KD, partial fine-tuning) says what to
train and on which rows; this module owns what they all share, so each rule lives once:

- **inputs**: a causal LM and its tokenizer, from objects or a name / dir (``resolve_model``);
  text packed into equal blocks (``pack_blocks``, ``packed_rows``), right-padded batches with
  the padding masked out of attention and loss (``padding_collator``);
- **one run** (``run_trainer``): gradient accumulation from the global batch and the number of
  processes, so the same preset gives the same optimizer steps on 1 CPU or under ``torchrun``;
  fp32 master weights for half-precision models (a bf16 one under bf16 autocast); validation
  loss before the first and after the last step; resumable checkpoints in ``<out>.checkpoints/``
  every ``save_steps`` (a rerun after a kill -9 resumes from the last one saved to the end,
  ``last_complete_checkpoint``, and ends as the run would have), none after the last step, whose
  weights ``publish`` saves as the model;
- **the base fingerprint** (``fingerprint``, ``check_fingerprint``): shapes, depth and removed
  blocks, written beside checkpoints and adapters so neither is ever applied to another model;
- **atomic outputs** (``prepare_out``, ``publish``): the finished dir appears in one rename with
  ``loss_log.csv`` and ``training.json``, or not at all.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .artifacts import atomic_dir, atomic_write_text, fault_point
from .data import encoded_once
from .errors import MismatchError
from .finite import check_finite_logs
from .models import get_blocks, load_model
from .precision import cast_dtypes, floating_dtypes
from .presets import Preset, get_preset

__all__ = [
    "ADAPTER_DIR",
    "BASE_FILE",
    "RetrainResult",
    "checkpoints_dir",
    "check_causal_lm",
    "resolve_model",
    "fingerprint",
    "check_fingerprint",
    "accumulation_steps",
    "world_size",
    "is_main_process",
    "pack_blocks",
    "packed_rows",
    "padding_collator",
    "lora_config",
    "save_adapter",
    "write_loss_log",
    "write_record",
    "training_arguments",
    "non_finite_loss_stop",
    "run_trainer",
    "last_complete_checkpoint",
    "run_on_cpt_budget",
    "save_trained",
    "publish",
    "preset_settings",
    "prepare_out",
    "start_run",
]

ADAPTER_DIR = "adapter"  # inside a LoRA output: the peft adapter alone
BASE_FILE = "base.json"  # shape fingerprint of the model an adapter / checkpoint belongs to


@dataclass
class RetrainResult:
    """What a retraining returns: the trained plain HF model and its record."""

    model: nn.Module
    tokenizer: object
    out_dir: Path
    method: str
    steps: int
    seconds: float
    log: list[dict] = field(default_factory=list)  # Trainer log_history: loss, learning_rate, eval_loss per step
    memory: dict = field(default_factory=dict)  # efficiency.track_peak_memory of the run (peak_mb, growth_mb, ...)
    reused_from: str | None = None  # the dir of the earlier run with this recipe it was copied from (train_cache)

    def log_frame(self):
        """The loss log as a DataFrame (one row per logged step)."""
        import pandas as pd

        return pd.DataFrame(self.log)


# ---- checks ---------------------------------------------------------------------------------

def checkpoints_dir(out_dir: str | os.PathLike) -> Path:
    """``<out>.checkpoints/``: where training runs and checkpoints live until ``<out>`` is published."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".checkpoints")


def check_causal_lm(model, what: str) -> None:
    """Refuse anything but a ``*ForCausalLM`` (bare or inside peft): every method trains next-token prediction."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(inner).__name__ not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise ValueError(
            f"model={what} is a {type(inner).__name__}, not a causal LM: retraining needs a *ForCausalLM "
            "model (a dir written by `shortened-llm prune`, an embedded name, or a hub id of a decoder LM)")


def resolve_model(model, tokenizer):
    """``(model, tokenizer)`` from objects or from a name / dir, checked to be a causal LM.

    A model dir's ``config.json`` is read before any weight loads, so a wrong dir fails in
    milliseconds instead of after loading gigabytes.
    """
    if isinstance(model, (str, os.PathLike)):
        source = Path(model)
        if source.is_dir() and (source / "config.json").exists():
            archs = json.loads((source / "config.json").read_text()).get("architectures") or []
            if archs and not any(a.endswith("ForCausalLM") for a in archs):
                raise ValueError(f"model={str(model)!r} holds a {archs[0]}, not a causal LM: retraining needs a "
                                 "*ForCausalLM model dir, e.g. one written by `shortened-llm prune`")
        name = str(model)
        model, loaded_tok = load_model(name)
        tokenizer = tokenizer or loaded_tok
        check_causal_lm(model, repr(name))
    else:
        check_causal_lm(model, type(model).__name__)
        if tokenizer is None:
            raise ValueError("tokenizer=None: pass the tokenizer that goes with the model object")
    return model, tokenizer


def fingerprint(model) -> dict:
    """What an adapter or a checkpoint must agree with: shapes, depth and which blocks were removed."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    record = getattr(model, "pruning", None) or getattr(inner, "pruning", None)
    cfg = inner.config
    return {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "num_blocks": len(get_blocks(inner)), "removed_blocks": list(record.removed_blocks) if record else []}


def check_fingerprint(model, path: Path, what: str, fix: str) -> None:
    """Refuse ``model`` when the fingerprint at ``path`` (if any) names another base: shapes alone may still fit."""
    if not path.exists():
        return
    expected, got = json.loads(path.read_text()), fingerprint(model)
    diff = {k: (expected.get(k), got[k]) for k in got if expected.get(k) != got[k]}
    if diff:
        detail = "; ".join(f"{k}: {a} there, {b} here" for k, (a, b) in diff.items())
        raise MismatchError(path, f"{what} belongs to a different base model ({detail})", fix)


def accumulation_steps(batch: int, micro: int, world: int, name: str) -> int:
    """Micro-batches per optimizer step, so ``batch`` stays the global batch whatever the number of processes."""
    if batch % (micro * world):
        raise ValueError(f"{name}_batch={batch} is not a multiple of {name}_micro_batch={micro} x {world} process(es): "
                         "pick a global batch that splits evenly")
    return batch // (micro * world)


def world_size() -> int:
    """Processes in this run (``torchrun``/``accelerate launch`` set ``WORLD_SIZE``; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0: the one process that writes files, so N processes never race on the same path."""
    return int(os.environ.get("RANK", "0")) == 0


# ---- data -----------------------------------------------------------------------------------

def pack_blocks(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """``(n_blocks, block_size)`` ids: every text + EOS, concatenated, cut into equal blocks (tail dropped).

    Packing wastes no compute on padding and gives every block the same number of
    predicted tokens, so per-step losses average the same way on 1 or N processes.
    """
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be >= 2 (cpt_block_size in the preset)")
    ids = _text_stream(tokenizer, tuple(texts))
    n = len(ids) // block_size
    if n < 1:
        raise ValueError(f"the texts hold {len(ids)} tokens: fewer than one block of {block_size}")
    return ids[: n * block_size].view(n, block_size).clone()  # the stream is shared (encoded_once)


@encoded_once(maxsize=4)
def _text_stream(tokenizer, texts: tuple[str, ...]) -> torch.Tensor:
    """Every text + EOS, encoded and concatenated: once per process for a corpus and a tokenizer's content,
    however many runs (and pruned copies of one model) train on it."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return torch.tensor([t for ids in tokenizer(list(texts)).input_ids for t in ids + eos], dtype=torch.long)


def packed_rows(tokenizer, data, block_size: int, val_blocks: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows of a corpus packed into ``block_size``-token blocks (CPT, KD, partial).

    The held-out tail is ``val_blocks`` blocks, at most 5 % of the corpus: the validation loss is
    logged before the first and after the last step, so it must stay cheap next to training.
    """
    from .data import load_texts

    texts = load_texts(data) if isinstance(data, str) else list(data)
    blocks = pack_blocks(tokenizer, texts, block_size)  # (n, block_size)
    n_val = max(1, min(val_blocks, len(blocks) // 20))
    if len(blocks) <= n_val:
        raise ValueError(f"the dataset packs into {len(blocks)} block(s) of {block_size} tokens: need at least 2")
    rows = [{"input_ids": b, "labels": b} for b in blocks.tolist()]
    return rows[:-n_val], rows[-n_val:]


def padding_collator(pad_id: int, side: str = "right"):
    """Pad a list of ``{"input_ids", "labels"}`` on ``side``; padding is masked out of attention and loss.

    Official LoRA pads on the left (its tokenizer's ``padding_side``); the packed text methods
    never pad (equal blocks), so the side matters for LoRA only.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r} must be 'right' or 'left' (lora_padding_side in the preset)")

    def collate(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for r in rows:
            ids, labels, pad = list(r["input_ids"]), list(r["labels"]), width - len(r["input_ids"])
            for key, row, fill in (("input_ids", ids, pad_id), ("labels", labels, -100), ("attention_mask", [1] * len(ids), 0)):
                out[key].append(row + [fill] * pad if side == "right" else [fill] * pad + row)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}  # each (B, T)

    return collate


# ---- LoRA adapters: one shape (the preset's lora_* fields) for LoRA retraining and KD-LoRA ------

def lora_config(preset: Preset):
    """peft's ``LoraConfig`` from the preset (official ``lora_retrain.py``: r=8, alpha=16, all seven projections)."""
    from peft import LoraConfig

    return LoraConfig(r=preset.lora_rank, lora_alpha=preset.lora_alpha, lora_dropout=preset.lora_dropout,
                      target_modules=list(preset.lora_targets), bias="none", task_type="CAUSAL_LM")


def save_adapter(peft_model, path: Path, base_print: dict) -> None:
    """The adapter alone, with the fingerprint of its base: ``apply_adapter`` refuses it on any other model."""
    peft_model.save_pretrained(path)
    atomic_write_text(path / BASE_FILE, json.dumps(base_print, indent=2))


# ---- the training loop shared by every method ---------------------------------------------

def write_loss_log(path: Path, history: list[dict]) -> None:
    """``loss_log.csv`` from the Trainer's log history: the fixed columns first, then any others, sorted."""
    keys = ["step", "epoch", "loss", "learning_rate", "grad_norm", "eval_loss"]
    keys += sorted({k for row in history for k in row} - set(keys))
    lines = [",".join(keys)] + [",".join("" if row.get(k) is None else str(row.get(k)) for k in keys) for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_record(staging: Path, record) -> None:
    """``pruning.json`` beside saved weights (and a sub-block dir's seal), so the dir reloads as what it is."""
    if record is not None:
        (staging / "pruning.json").write_text(record.to_json())
        record.seal_dir(staging)  # a no-op for a plain block record


def training_arguments(work: Path, *, lr: float, batch: int, micro: int, max_steps: int | None, epochs: float,
                       warmup: int, scheduler: str, seed: int, save_steps: int, accum: int, steps_planned: int,
                       evaluate: bool, progress: bool, eval_steps: int | None = None, best_checkpoint: bool = False,
                       mixed_precision: str = "none", weight_decay: float = 0.0, adam_beta2: float = 0.999,
                       cuda: bool | None = None, resumed: bool = False, bf16_autocast: bool = False):
    """The ``TrainingArguments`` of one run (``run_trainer``'s), built apart so a test can read them.

    ``eval_steps=None`` evaluates before the first and after the last step only; a number evaluates
    every that many steps too (official LoRA: 100). ``best_checkpoint`` keeps the checkpoint of the
    lowest validation loss (official: ``load_best_model_at_end``). ``mixed_precision="fp16"`` is
    fp16 autocast with loss scaling over fp32 master weights, on CUDA only: on a CPU it is fp32.
    ``bf16_autocast``: the forward runs under bf16 autocast (``master_weights`` said the model is bf16).
    ``resumed``: the run goes on from a checkpoint, whose log already holds the validation loss
    before the first step, so it is not measured again (the loss log then equals an uninterrupted run's).
    """
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available() if cuda is None else cuda
    best = bool(best_checkpoint and evaluate)
    eval_every = min(eval_steps or steps_planned, steps_planned)
    if best and (save_steps % eval_every or save_steps > steps_planned):  # a short run: checkpoint where it evaluates
        save_steps = eval_every
    return TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum, learning_rate=lr, lr_scheduler_type=scheduler, warmup_steps=warmup,
        max_steps=max_steps if max_steps is not None else -1, num_train_epochs=epochs, weight_decay=weight_decay,
        adam_beta2=adam_beta2,
        # the same AdamW in one kernel over all weights: 0.18 s a step on the embedded model's 135 M fp32 weights
        # against 0.52 s for the per-tensor loop (one AMD EPYC thread), the optimizer's share of a CPT step
        optim="adamw_torch_fused", logging_steps=1, logging_first_step=True, save_strategy="steps",
        save_steps=save_steps, save_total_limit=2, seed=seed,
        # validation loss before the first and after the last step; evaluating inside train(), not before it,
        # matters: an evaluate() call before train() leaves the model unwrapped, and DDP would never sync
        eval_strategy="steps" if evaluate else "no", eval_steps=eval_every,
        eval_on_start=evaluate and not resumed, data_seed=seed, report_to="none",
        load_best_model_at_end=best, metric_for_best_model="eval_loss" if best else None, greater_is_better=False if best else None,
        fp16=cuda and mixed_precision == "fp16", bf16=bf16_autocast,
        disable_tqdm=not progress, use_cpu=not cuda, dataloader_pin_memory=cuda,
        remove_unused_columns=False, ddp_find_unused_parameters=False,
    )


def master_weights(model, mixed_precision: str = "none", cuda: bool | None = None) -> tuple[torch.dtype | None, bool]:
    """Make the weights that train fp32; return ``(half, bf16_autocast)``: the half dtype ``model``
    came in (``None``: fp32) and whether its forward is to run under bf16 autocast.

    AdamW on half-precision weights loses the small updates (a bf16 weight has 8 bits of
    mantissa), so whatever the optimizer updates (LoRA adapters, CPT/KD/partial weights) is fp32.
    Under bf16 autocast (``precision.training_autocast``) a bf16 model keeps its frozen weights (a
    LoRA base, partial fine-tuning's frozen blocks) in bf16: the matrix products run in bf16, where
    the speed is, and the gradients land in fp32. Measured in ``benchmarks/bench_dtype.py``
    ("package" rows). An fp16 model, or a run under fp16 AMP (the official LoRA on CUDA), trains all
    in fp32 as before: fp16 frozen weights need fp16 autocast, which only CUDA has.
    ``run_trainer`` casts the parameters back to the returned dtype and every buffer to its own
    (``precision.cast_dtypes``).
    """
    from .precision import training_autocast

    cuda = torch.cuda.is_available() if cuda is None else cuda
    half = next((p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)), None)
    bf16_autocast = training_autocast(half, mixed_precision, cuda) == torch.bfloat16
    if bf16_autocast:
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    elif half is not None:
        model.float()
    return half, bf16_autocast


def training_precision(args) -> str:
    """What a run's arithmetic was, for ``training.json``: the weights the optimizer updated and the autocast."""
    return ("bf16 autocast, fp32 master weights" if args.bf16 else
            "fp16 autocast, fp32 master weights" if args.fp16 else "fp32")


def non_finite_loss_stop():
    """A callback that stops the run at the first logged loss, validation loss or gradient norm
    that is NaN or inf, naming the step (``finite.check_finite_logs``)."""
    from transformers import TrainerCallback

    class NonFiniteLossStop(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            check_finite_logs(logs, state.global_step)
            return control

    return NonFiniteLossStop()


def _no_checkpoint_after_the_last_step():
    """A callback that drops the checkpoint the Trainer saves after the last step (whatever ``save_steps``).

    ``publish`` writes the final model right after it and then deletes the checkpoints, so that one
    was written only to be deleted. For a full-weight run (CPT, KD, partial) it holds the weights and
    AdamW's two moments of what trains, up to three times the weights in fp32: 4.0 s of the 27 s of a
    tiny-preset CPT run of the embedded model (AMD EPYC, one thread). A kill between the last step and
    ``publish`` resumes from the checkpoint before and trains those steps again, to the same weights.
    """
    from transformers import TrainerCallback

    class NoCheckpointAfterTheLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after the Trainer's own flow callback set it
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_save = False
            return control

    return NoCheckpointAfterTheLastStep()


def _fault_points():
    """A callback with the training kill points of the test hook (``artifacts.FAULT_ENV``):
    ``checkpoint`` (a checkpoint fully saved, before the next step) and ``step`` (mid-step: the
    gradients computed, not yet applied). Unset, each costs one dict lookup per step."""
    from transformers import TrainerCallback

    class FaultPoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            fault_point("checkpoint")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            fault_point("step")

    return FaultPoints()


def last_complete_checkpoint(work: Path) -> str | None:
    """The newest ``checkpoint-<step>`` in ``work`` that was saved to the end, or None; removes the others' debris.

    The Trainer writes a checkpoint in place (weights, optimizer, RNG, then ``trainer_state.json``
    last), so a run killed while saving leaves a ``checkpoint-<step>`` without a readable state,
    and ``get_last_checkpoint`` would hand it to the resume, which then fails on every rerun.
    Such a dir is removed here, and the resume starts from the one before it.
    """
    import re

    steps = sorted((int(m.group(1)), p) for p in work.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return str(path)
        except (OSError, ValueError):  # missing or cut short: killed mid-save
            shutil.rmtree(path, ignore_errors=True)
    return None


def run_trainer(model, tokenizer, train_rows, eval_rows, *, out_dir: Path, lr: float, batch: int, micro: int,
                max_steps: int | None, epochs: float, warmup: int | float, scheduler: str, seed: int, save_steps: int,
                resume: bool, progress: bool, callbacks, name: str, trainer_cls=None, eval_steps: int | None = None,
                best_checkpoint: bool = False, mixed_precision: str = "none", padding_side: str = "right",
                weight_decay: float = 0.0, adam_beta2: float = 0.999, keep_checkpoints: bool = False):
    """Run a ``Trainer`` in ``<out>.checkpoints``; return it, the seconds it took and the work dir.

    Checkpoints are saved every ``save_steps`` for a resume after a kill; the one the Trainer adds after
    the last step is skipped (``_no_checkpoint_after_the_last_step``) unless ``keep_checkpoints`` or
    ``best_checkpoint`` needs it.

    ``batch`` is the global batch (``name`` names its preset fields in errors); a float
    ``warmup`` is a share of the planned steps. ``trainer_cls`` swaps the loss (KD).
    ``eval_steps``, ``best_checkpoint`` and ``mixed_precision`` are ``training_arguments``'s;
    ``padding_side`` is ``padding_collator``'s; ``weight_decay`` and ``adam_beta2`` are AdamW's.
    """
    from accelerate.utils import extract_model_from_parallel
    from transformers import PrinterCallback, Trainer

    work = checkpoints_dir(out_dir)
    world = world_size()
    accum = accumulation_steps(batch, micro, world, name)
    steps_planned = max_steps or math.ceil(epochs * len(train_rows) / batch)
    if isinstance(warmup, float):  # a ratio of the planned steps
        warmup = int(round(warmup * steps_planned))
    last = last_complete_checkpoint(work) if work.is_dir() and resume else None
    if last is not None:
        check_fingerprint(model, work / BASE_FILE, f"checkpoint dir {str(work)!r}",
                          "Delete it, or pass resume=False (CLI: --no-resume) to start over.")
    model.config.use_cache = False  # no KV cache while training
    dtypes = floating_dtypes(model)  # before master_weights casts to fp32: what the buffers go back to
    half, bf16_autocast = master_weights(model, mixed_precision)
    args = training_arguments(
        work, lr=lr, batch=batch, micro=micro, max_steps=max_steps, epochs=epochs, warmup=warmup, scheduler=scheduler,
        seed=seed, save_steps=save_steps, accum=accum, steps_planned=steps_planned, evaluate=bool(eval_rows),
        progress=progress, eval_steps=eval_steps, best_checkpoint=best_checkpoint, mixed_precision=mixed_precision,
        weight_decay=weight_decay, adam_beta2=adam_beta2, resumed=last is not None,
        bf16_autocast=bf16_autocast)
    trainer = (trainer_cls or Trainer)(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows or None,
                      data_collator=padding_collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                                     else tokenizer.eos_token_id, side=padding_side),
                      callbacks=[non_finite_loss_stop(), _fault_points(), *(callbacks or [])])  # NaN/inf loss: stops, named
    if not (keep_checkpoints or args.load_best_model_at_end):
        trainer.add_callback(_no_checkpoint_after_the_last_step())
    if not progress:  # no bars means no per-step log dicts printed either; the loss log keeps them
        trainer.remove_callback(PrinterCallback)
    if trainer.is_world_process_zero():
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / BASE_FILE, json.dumps(fingerprint(model), indent=2))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    model.config.use_cache = True
    # accelerate ran the model's forward under autocast with fp32 outputs (its mixed-precision wrapper);
    # taken off, the trained model computes as its reload does, not in another precision
    extract_model_from_parallel(model, keep_fp32_wrapper=False)
    if half is not None:
        # every parameter to half, LoRA's fp32 adapters too (merged in bf16, as every saved run was), but every
        # buffer to its own dtype: after model.to(half) the trained model rotated positions by bf16 angles (RoPE's
        # inv_freq) and scored 118.14 where its reload scores 118.21 (notebook 09's LoRA row)
        cast_dtypes(model, {**dtypes, **{name: half for name, p in model.named_parameters() if p.is_floating_point()}})
    return trainer, time.perf_counter() - t0, work


def run_on_cpt_budget(model, tokenizer, train_rows, eval_rows, preset, *, out_dir: Path, max_steps: int | None,
                      seed: int, resume: bool, progress: bool, callbacks, trainer_cls=None,
                      keep_checkpoints: bool = False):
    """Full-weight training on ``preset``'s CPT budget (lr, batch, cosine warm-up): CPT, KD and partial share it."""
    return run_trainer(
        model, tokenizer, train_rows, eval_rows, out_dir=out_dir, lr=preset.cpt_lr,
        batch=preset.cpt_batch, micro=preset.cpt_micro_batch, max_steps=max_steps or preset.cpt_steps, epochs=1.0,
        warmup=float(preset.cpt_warmup_ratio), scheduler="cosine", seed=seed, save_steps=preset.retrain_save_steps,
        resume=resume, progress=progress, callbacks=callbacks, name="cpt", trainer_cls=trainer_cls,
        keep_checkpoints=keep_checkpoints,
        weight_decay=preset.cpt_weight_decay, adam_beta2=preset.cpt_adam_beta2)


def save_trained(trainer, tokenizer, staging: Path, record) -> None:
    """A full-weight run's model, tokenizer and pruning record into ``staging``.

    Every process calls it: under FSDP ``save_model`` gathers the full weights from all of them.
    """
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        write_record(staging, record)


def publish(trainer, work: Path, out_dir: Path, overwrite: bool, info: dict, keep_checkpoints: bool) -> None:
    """Main process: move ``work/final`` into ``out_dir`` in one rename, write the logs, drop checkpoints."""
    if trainer.is_world_process_zero():
        staging = work / "final"
        write_loss_log(staging / "loss_log.csv", trainer.state.log_history)
        info = {**info, "training_precision": training_precision(trainer.args)}
        atomic_write_text(staging / "training.json", json.dumps(info, indent=2, default=str) + "\n")
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            for item in staging.iterdir():
                item.rename(tmp / item.name)
        if not keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def preset_settings(preset: Preset, prefix: str) -> dict:
    """The preset fields a method trained with (``lora_*`` or ``cpt_*``), recorded in ``training.json``."""
    return {k: v for k, v in vars(preset).items() if k.startswith(prefix)}


def prepare_out(out_dir, overwrite: bool) -> Path:
    """``out_dir`` as a path, refused up front when it exists and ``overwrite`` is off (not after hours of training)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"out_dir={str(out_dir)!r} already exists: pass overwrite=True (CLI: --overwrite) to replace it")
    return out_dir


def packed_text_run(model, tokenizer, data, preset: Preset, seed: int | None):
    """What every method that trains on packed text (CPT, KD, partial) does next: the seed (the
    preset's unless given), the packed train / validation blocks, the pruning record to carry into
    the output, and the seed set (transformers.set_seed: python, numpy, torch) before training.
    Returns ``(seed, train_rows, val_rows, record)``."""
    from transformers import set_seed

    seed = preset.seed if seed is None else seed
    train_rows, val_rows = packed_rows(tokenizer, data, preset.cpt_block_size, preset.cpt_val_blocks)
    record = getattr(model, "pruning", None)
    set_seed(seed)
    return seed, train_rows, val_rows, record


def start_run(model, tokenizer, out_dir, preset, overwrite: bool, overrides: dict):
    """``(preset, out_dir, model, tokenizer)`` for a method's first lines, checked in the order that costs least.

    A wrong preset field or an existing ``out_dir`` fails before any weight loads.
    """
    preset = get_preset(preset, **overrides)
    out_dir = prepare_out(out_dir, overwrite)
    return (preset, out_dir, *resolve_model(model, tokenizer))
