"""Retraining a depth-pruned model (paper, Section 3.3 and Tables 4-6): LoRA, CPT, CPT then LoRA.

- ``lora_retrain``: peft LoRA on cleaned Alpaca with the Alpaca prompt (``prompts.py``),
  the official ``lora_retrain.py`` settings (r=8, alpha=16, dropout 0.05, all seven
  projections, 2 epochs, lr 1e-4, batch 64 of micro-batches 4, cutoff 256, loss on the
  response only). Saves the adapter and the merged plain HF model.
- ``continued_pretrain``: full-parameter causal-LM training on a text corpus packed into
  fixed-length blocks, cosine schedule with warm-up. The paper's CPT (SlimPajama) is what
  rescues severe pruning: LoRA's low-rank updates cannot rebuild what many missing blocks
  computed, full updates of every weight on lots of plain text can.
- ``cpt_then_lora``: both, in that order.

All three use the Hugging Face ``Trainer``, so one script runs unchanged on one CPU, under
``torchrun``/``accelerate launch`` with DDP (gloo on CPUs), and with FSDP set in an
accelerate config (CPT). Outputs are atomic: training happens in ``<out>.checkpoints/``
(checkpoints there make an interrupted run resumable) and only the finished model dir is
renamed into ``<out>``; it holds the model, ``pruning.json``, ``loss_log.csv`` and
``training.json`` (and ``adapter/`` for LoRA).
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

from .artifacts import atomic_dir, atomic_write_text, pruned_dir
from .models import count_params, get_blocks, load_model, save_model
from .precision import precision_record
from .presets import Preset, get_preset
from .prompts import alpaca_prompt, load_instructions, response_of, tokenize_record

__all__ = [
    "METHODS",
    "RetrainResult",
    "lora_retrain",
    "continued_pretrain",
    "cpt_then_lora",
    "apply_adapter",
    "pack_blocks",
    "packed_rows",
    "checkpoints_dir",
    "pruned_model",
    "retrain_or_load",
    "answer",
]

METHODS = ("lora", "cpt", "cpt-lora")
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

    def log_frame(self):
        """The loss log as a DataFrame (one row per logged step)."""
        import pandas as pd

        return pd.DataFrame(self.log)


# ---- checks ---------------------------------------------------------------------------------

def checkpoints_dir(out_dir: str | os.PathLike) -> Path:
    """``<out>.checkpoints/``: where training runs and checkpoints live until ``<out>`` is published."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".checkpoints")


def _check_causal_lm(model, what: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(inner).__name__ not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise ValueError(
            f"model={what} is a {type(inner).__name__}, not a causal LM: retraining needs a *ForCausalLM "
            "model (a dir written by `shortened-llm prune`, an embedded name, or a hub id of a decoder LM)")


def _resolve_model(model, tokenizer):
    """``(model, tokenizer)`` from objects or from a name / dir, checked to be a causal LM."""
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
        _check_causal_lm(model, repr(name))
    else:
        _check_causal_lm(model, type(model).__name__)
        if tokenizer is None:
            raise ValueError("tokenizer=None: pass the tokenizer that goes with the model object")
    return model, tokenizer


def _fingerprint(model) -> dict:
    """What an adapter or a checkpoint must agree with: shapes, depth and which blocks were removed."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    record = getattr(model, "pruning", None) or getattr(inner, "pruning", None)
    cfg = inner.config
    return {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "num_blocks": len(get_blocks(inner)), "removed_blocks": list(record.removed_blocks) if record else []}


def _check_fingerprint(model, path: Path, what: str, fix: str) -> None:
    if not path.exists():
        return
    expected, got = json.loads(path.read_text()), _fingerprint(model)
    diff = {k: (expected.get(k), got[k]) for k in got if expected.get(k) != got[k]}
    if diff:
        detail = "; ".join(f"{k}: {a} there, {b} here" for k, (a, b) in diff.items())
        raise ValueError(f"{what} belongs to a different base model ({detail}). {fix}")


def _accumulation(batch: int, micro: int, world: int, name: str) -> int:
    if batch % (micro * world):
        raise ValueError(f"{name}_batch={batch} is not a multiple of {name}_micro_batch={micro} x {world} process(es): "
                         "pick a global batch that splits evenly")
    return batch // (micro * world)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---- data -----------------------------------------------------------------------------------

def pack_blocks(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """``(n_blocks, block_size)`` ids: every text + EOS, concatenated, cut into equal blocks (tail dropped).

    Packing wastes no compute on padding and gives every block the same number of
    predicted tokens, so per-step losses average the same way on 1 or N processes.
    """
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be >= 2 (cpt_block_size in the preset)")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [t for ids in tokenizer(list(texts)).input_ids for t in ids + eos]
    n = len(ids) // block_size
    if n < 1:
        raise ValueError(f"the texts hold {len(ids)} tokens: fewer than one block of {block_size}")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


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


def _collate(pad_id: int):
    """Right-pad a list of ``{"input_ids", "labels"}``; padding is masked out of attention and loss."""

    def collate(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for r in rows:
            ids, labels, pad = list(r["input_ids"]), list(r["labels"]), width - len(r["input_ids"])
            out["input_ids"].append(ids + [pad_id] * pad)
            out["labels"].append(labels + [-100] * pad)
            out["attention_mask"].append([1] * len(ids) + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}  # each (B, T)

    return collate


def _instruction_split(tokenizer, records: list[dict], preset: Preset, seed: int):
    """Tokenized train and held-out validation records (official: 2000 held out, seed-shuffled)."""
    import random
    import warnings

    n_val = preset.lora_val_size
    if n_val > len(records) // 10:
        warnings.warn(f"lora_val_size={n_val} is more than 10% of the {len(records)} records: holding out "
                      f"{len(records) // 10} instead", stacklevel=3)
        n_val = len(records) // 10
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    rows = [tokenize_record(tokenizer, records[i], preset.lora_cutoff) for i in order]
    return rows[n_val:], rows[:n_val]


# ---- the training loop shared by every method ---------------------------------------------

def _write_log(path: Path, history: list[dict]) -> None:
    keys = ["step", "epoch", "loss", "learning_rate", "grad_norm", "eval_loss"]
    keys += sorted({k for row in history for k in row} - set(keys))
    lines = [",".join(keys)] + [",".join("" if row.get(k) is None else str(row.get(k)) for k in keys) for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _train(model, tokenizer, train_rows, eval_rows, *, out_dir: Path, method: str, lr: float, batch: int, micro: int,
           max_steps: int | None, epochs: float, warmup: int | float, scheduler: str, seed: int, save_steps: int,
           resume: bool, progress: bool, callbacks, name: str, trainer_cls=None):
    """Run a ``Trainer`` in ``<out>.checkpoints``; return it, the seconds it took and the work dir."""
    from transformers import PrinterCallback, Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    work = checkpoints_dir(out_dir)
    world = _world_size()
    accum = _accumulation(batch, micro, world, name)
    steps_planned = max_steps or math.ceil(epochs * len(train_rows) / batch)
    if isinstance(warmup, float):  # a ratio of the planned steps
        warmup = int(round(warmup * steps_planned))
    last = get_last_checkpoint(str(work)) if work.is_dir() and resume else None
    if last is not None:
        _check_fingerprint(model, work / BASE_FILE, f"checkpoint dir {str(work)!r}",
                           "Delete it, or pass resume=False (CLI: --no-resume) to start over.")
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum, learning_rate=lr, lr_scheduler_type=scheduler, warmup_steps=warmup,
        max_steps=max_steps if max_steps is not None else -1, num_train_epochs=epochs, weight_decay=0.0,
        optim="adamw_torch", logging_steps=1, logging_first_step=True, save_strategy="steps", save_steps=save_steps,
        save_total_limit=2, seed=seed,
        # validation loss before the first and after the last step; evaluating inside train(), not before it,
        # matters: an evaluate() call before train() leaves the model unwrapped, and DDP would never sync
        eval_strategy="steps" if eval_rows else "no", eval_steps=steps_planned, eval_on_start=bool(eval_rows), data_seed=seed, report_to="none",
        disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False, ddp_find_unused_parameters=False,
    )
    model.config.use_cache = False  # no KV cache while training
    # fp32 master weights: AdamW on bf16/fp16 weights loses the small updates (a bf16 weight
    # has 8 bits of mantissa), so a model loaded in half precision trains in fp32 and goes
    # back to its dtype afterwards. (bf16 autocast over fp32 weights, for speed, is not done yet.)
    half = next((p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)), None)
    if half is not None:
        model.float()
    trainer = (trainer_cls or Trainer)(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows or None,
                      data_collator=_collate(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                             else tokenizer.eos_token_id),
                      callbacks=list(callbacks or []))
    if not progress:  # no bars means no per-step log dicts printed either; the loss log keeps them
        trainer.remove_callback(PrinterCallback)
    if trainer.is_world_process_zero():
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / BASE_FILE, json.dumps(_fingerprint(model), indent=2))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    model.config.use_cache = True
    if half is not None:
        model.to(half)
    return trainer, time.perf_counter() - t0, work


def _train_on_cpt_budget(model, tokenizer, train_rows, eval_rows, preset, *, out_dir: Path, method: str,
                         max_steps: int | None, seed: int, resume: bool, progress: bool, callbacks, trainer_cls=None):
    """Full-weight training on ``preset``'s CPT budget (lr, batch, cosine warm-up): CPT, KD and partial share it."""
    return _train(
        model, tokenizer, train_rows, eval_rows, out_dir=out_dir, method=method, lr=preset.cpt_lr,
        batch=preset.cpt_batch, micro=preset.cpt_micro_batch, max_steps=max_steps or preset.cpt_steps, epochs=1.0,
        warmup=float(preset.cpt_warmup_ratio), scheduler="cosine", seed=seed, save_steps=preset.retrain_save_steps,
        resume=resume, progress=progress, callbacks=callbacks, name="cpt", trainer_cls=trainer_cls)


def _publish(trainer, work: Path, out_dir: Path, overwrite: bool, info: dict, keep_checkpoints: bool) -> None:
    """Main process: move ``work/final`` into ``out_dir`` in one rename, write the logs, drop checkpoints."""
    if trainer.is_world_process_zero():
        staging = work / "final"
        _write_log(staging / "loss_log.csv", trainer.state.log_history)
        atomic_write_text(staging / "training.json", json.dumps(info, indent=2, default=str) + "\n")
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            for item in staging.iterdir():
                item.rename(tmp / item.name)
        if not keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def _settings(preset: Preset, prefix: str) -> dict:
    return {k: v for k, v in vars(preset).items() if k.startswith(prefix)}


def _prepare_out(out_dir, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"out_dir={str(out_dir)!r} already exists: pass overwrite=True (CLI: --overwrite) to replace it")
    return out_dir


# ---- public API -----------------------------------------------------------------------------

def lora_retrain(model, tokenizer=None, out_dir: str | os.PathLike = "retrained/lora", preset: str | Preset = "smoke",
                 data="alpaca", max_steps: int | None = None, seed: int | None = None, overwrite: bool = False,
                 resume: bool = True, keep_checkpoints: bool = False, progress: bool = True, callbacks=(),
                 **overrides) -> RetrainResult:
    """LoRA on instruction data; returns the merged plain model (trainable again) and its record.

    ``model`` is a model object (with ``tokenizer``) or a name / model dir. ``max_steps``
    (else ``preset.lora_steps``, else ``lora_epochs`` epochs) counts optimizer steps of
    ``lora_batch`` sequences across all processes. ``overrides`` replace preset fields.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    preset = get_preset(preset, **overrides)
    out_dir = _prepare_out(out_dir, overwrite)
    model, tokenizer = _resolve_model(model, tokenizer)
    seed = preset.seed if seed is None else seed
    records = load_instructions(data)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError("LoRA under FSDP is not supported here: run LoRA with DDP (the adapter is small and the "
                         "base fits each device); FSDP is for continued_pretrain")
    record = getattr(model, "pruning", None)
    train_rows, val_rows = _instruction_split(tokenizer, records, preset, seed)
    set_seed(seed)  # LoRA's A matrices are drawn here
    lora = LoraConfig(r=preset.lora_rank, lora_alpha=preset.lora_alpha, lora_dropout=preset.lora_dropout,
                      target_modules=list(preset.lora_targets), bias="none", task_type="CAUSAL_LM")
    base_print = _fingerprint(model)
    peft_model = get_peft_model(model, lora)
    steps = max_steps or preset.lora_steps
    warmup = min(preset.lora_warmup_steps, max(0, (steps or 10**9) // 10))
    trainer, seconds, work = _train(
        peft_model, tokenizer, train_rows, val_rows, out_dir=out_dir, method="lora", lr=preset.lora_lr,
        batch=preset.lora_batch, micro=preset.lora_micro_batch, max_steps=steps, epochs=preset.lora_epochs,
        warmup=warmup, scheduler="linear", seed=seed, save_steps=preset.retrain_save_steps, resume=resume,
        progress=progress, callbacks=callbacks, name="lora")
    adapter_tmp = work / "adapter.tmp"
    if trainer.is_world_process_zero():  # before merging: merge_and_unload strips the LoRA layers
        peft_model.save_pretrained(adapter_tmp)
        atomic_write_text(adapter_tmp / BASE_FILE, json.dumps(base_print, indent=2))
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():  # merge_and_unload leaves the frozen base flags: make it a normal model again
        p.requires_grad_(True)
    merged.eval()
    if record is not None:
        merged.pruning = record
    if trainer.is_world_process_zero():
        staging = work / "final"
        save_model(merged, tokenizer, staging, overwrite=True)
        adapter_tmp.rename(staging / ADAPTER_DIR)
    info = {"method": "lora", "steps": trainer.state.global_step, "seconds": round(seconds, 2), "seed": seed,
            "processes": _world_size(), "train_records": len(train_rows), "val_records": len(val_rows),
            "params": count_params(merged), "base": base_print, "preset": preset.name,
            "precision": precision_record(merged), **_settings(preset, "lora_")}
    _publish(trainer, work, out_dir, overwrite, info, keep_checkpoints)
    return RetrainResult(merged, tokenizer, out_dir, "lora", trainer.state.global_step, seconds,
                         list(trainer.state.log_history))


def continued_pretrain(model, tokenizer=None, out_dir: str | os.PathLike = "retrained/cpt", preset: str | Preset = "smoke",
                       data: str | list[str] = "c4", max_steps: int | None = None, seed: int | None = None,
                       overwrite: bool = False, resume: bool = True, keep_checkpoints: bool = False,
                       progress: bool = True, callbacks=(), **overrides) -> RetrainResult:
    """Full-parameter causal-LM training on packed text blocks, cosine schedule with warm-up.

    ``data`` is a dataset name (``load_texts``) or a list of texts. Runs unchanged under
    ``torchrun``/``accelerate launch``: ``cpt_batch`` is the global batch, split over processes.
    """
    from transformers import set_seed

    preset = get_preset(preset, **overrides)
    out_dir = _prepare_out(out_dir, overwrite)
    model, tokenizer = _resolve_model(model, tokenizer)
    seed = preset.seed if seed is None else seed
    train_rows, val_rows = packed_rows(tokenizer, data, preset.cpt_block_size, preset.cpt_val_blocks)
    record = getattr(model, "pruning", None)
    set_seed(seed)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    trainer, seconds, work = _train_on_cpt_budget(
        model, tokenizer, train_rows, val_rows, preset, out_dir=out_dir, method="cpt", max_steps=max_steps, seed=seed,
        resume=resume, progress=progress, callbacks=callbacks)
    staging = work / "final"
    trainer.save_model(str(staging))  # every process calls it: under FSDP it gathers the full weights
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        if record is not None:
            (staging / "pruning.json").write_text(record.to_json())
    info = {"method": "cpt", "steps": trainer.state.global_step, "seconds": round(seconds, 2), "seed": seed,
            "processes": _world_size(), "train_blocks": len(train_rows), "val_blocks": len(val_rows),
            "tokens_per_step": preset.cpt_batch * preset.cpt_block_size, "base": _fingerprint(model),
            "preset": preset.name, "precision": precision_record(model), **_settings(preset, "cpt_")}
    _publish(trainer, work, out_dir, overwrite, info, keep_checkpoints)
    trained = trainer.model
    trained.eval()
    return RetrainResult(trained, tokenizer, out_dir, "cpt", trainer.state.global_step, seconds,
                         list(trainer.state.log_history))


def cpt_then_lora(model, tokenizer=None, out_dir: str | os.PathLike = "retrained/cpt-lora",
                  preset: str | Preset = "smoke", cpt_dir: str | os.PathLike | None = None,
                  cpt_steps: int | None = None, lora_steps: int | None = None, seed: int | None = None,
                  overwrite: bool = False, resume: bool = True, progress: bool = True, **overrides) -> RetrainResult:
    """CPT (into ``cpt_dir``, default ``<out>.cpt``; reused when it already exists), then LoRA into ``out_dir``."""
    out_dir = _prepare_out(out_dir, overwrite)
    cpt_dir = Path(cpt_dir) if cpt_dir is not None else out_dir.with_name(out_dir.name + ".cpt")
    if (cpt_dir / "config.json").exists():
        stage, tokenizer = load_model(cpt_dir)
        cpt_seconds = json.loads((cpt_dir / "training.json").read_text()).get("seconds", 0.0) \
            if (cpt_dir / "training.json").exists() else 0.0
    else:
        first = continued_pretrain(model, tokenizer, cpt_dir, preset=preset, max_steps=cpt_steps, seed=seed,
                                   resume=resume, progress=progress, **overrides)
        stage, tokenizer, cpt_seconds = first.model, first.tokenizer, first.seconds
    second = lora_retrain(stage, tokenizer, out_dir, preset=preset, max_steps=lora_steps, seed=seed,
                          overwrite=overwrite, resume=resume, progress=progress, **overrides)
    second.method = "cpt-lora"
    second.seconds += cpt_seconds
    if _is_main():  # training.json counts both stages, so a reload reports what the chain cost
        info = json.loads((out_dir / "training.json").read_text())
        info.update(method="cpt-lora", seconds=second.seconds, lora_seconds=second.seconds - cpt_seconds,
                    cpt_seconds=cpt_seconds, cpt_dir=str(cpt_dir))
        atomic_write_text(out_dir / "training.json", json.dumps(info, indent=2, default=str) + "\n")
    return second


def apply_adapter(model, adapter_dir: str | os.PathLike):
    """A LoRA adapter saved by ``lora_retrain`` on ``model``, refused when it belongs to another base."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / ADAPTER_DIR / "adapter_config.json").exists():
        adapter_dir = adapter_dir / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"adapter_dir={str(adapter_dir)!r} has no adapter_config.json: pass the `adapter/` "
                                "folder of a lora_retrain output")
    _check_fingerprint(model, adapter_dir / BASE_FILE, f"adapter {str(adapter_dir)!r}",
                       "Apply it to the model it was trained on (same pruned blocks), or retrain LoRA on this one.")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except RuntimeError as err:  # size mismatch from load_state_dict
        raise ValueError(f"adapter {str(adapter_dir)!r} does not fit this model's shapes: {str(err)[:300]}") from None


# ---- notebook helpers -----------------------------------------------------------------------

from .pipeline import pruned_model  # noqa: E402,F401  (moved: the one pruning pipeline; notebooks import it from here)


def retrain_or_load(method: str, model, tokenizer, out_dir: str | os.PathLike, preset: str | Preset = "smoke", **kwargs):
    """Train-or-load for notebooks: ``(model, tokenizer, loss log DataFrame, training.json dict)``.

    ``out_dir`` is loaded when it already holds a finished run; otherwise ``method``
    (``lora``, ``cpt``, ``cpt-lora``) trains into it.
    """
    import pandas as pd

    runners = {"lora": lora_retrain, "cpt": continued_pretrain, "cpt-lora": cpt_then_lora}
    if method not in runners:
        raise ValueError(f"Unknown retraining method {method!r}. Available: {', '.join(runners)}")
    out_dir = Path(out_dir)
    if not (out_dir / "training.json").exists():
        result = runners[method](model, tokenizer, out_dir, preset=preset, **kwargs)
        model, tokenizer = result.model, result.tokenizer
    else:
        model, tokenizer = load_model(out_dir)
    return model, tokenizer, pd.read_csv(out_dir / "loss_log.csv"), json.loads((out_dir / "training.json").read_text())


@torch.no_grad()
def answer(model, tokenizer, instructions: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to instructions in the Alpaca prompt (what LoRA on Alpaca teaches)."""
    device = next(model.parameters()).device
    out = []
    for text in instructions:
        ids = tokenizer(alpaca_prompt(text), return_tensors="pt").input_ids.to(device)
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(response_of(alpaca_prompt(text) + tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)))
    return out
