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

All three run on ``trainer.py``'s machinery (the Hugging Face ``Trainer``), so one script
runs unchanged on one CPU, under ``torchrun``/``accelerate launch`` with DDP (gloo on CPUs),
and with FSDP set in an accelerate config (CPT). Outputs are atomic: training happens in
``<out>.checkpoints/`` (checkpoints there make an interrupted run resumable) and only the
finished model dir is renamed into ``<out>``; it holds the model, ``pruning.json``,
``loss_log.csv`` and ``training.json`` (and ``adapter/`` for LoRA). The three register
themselves in ``recovery.py``'s registry, through which ``retrain_or_load`` runs any method.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .artifacts import atomic_write_text
from .models import count_params, load_model, save_model
from .precision import precision_record
from .presets import Preset
from .prompts import alpaca_prompt, load_instructions, response_of, tokenize_record
from .recovery import RecoveryMethod, get_recovery, register_recovery
from .trainer import (ADAPTER_DIR, BASE_FILE, RetrainResult, check_fingerprint, checkpoints_dir, fingerprint,
                      is_main_process, lora_config, pack_blocks, packed_rows, packed_text_run, prepare_out, preset_settings, publish,
                      run_on_cpt_budget, run_trainer, save_adapter, save_trained, start_run, world_size)

__all__ = [
    "METHODS",
    "RetrainResult",
    "lora_retrain",
    "lora_procedure",
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


def _instruction_split(tokenizer, records: list[dict], preset: Preset, seed: int):
    """Tokenized train and held-out validation records, split as ``preset.lora_split`` says.

    ``train_test_split`` is the official split (``datasets``' ``train_test_split(test_size,
    seed=42)``: the same records held out as the official run when the data is the same);
    ``shuffle`` is a seeded shuffle with the first ``lora_val_size`` held out. Either holds out at
    most 10 % of the records, with a warning: the pack's 1000 records cannot spare the official 2000.
    """
    import random
    import warnings

    n_val = preset.lora_val_size
    if n_val > len(records) // 10:
        warnings.warn(f"lora_val_size={n_val} is more than 10% of the {len(records)} records: holding out "
                      f"{len(records) // 10} instead", stacklevel=3)
        n_val = len(records) // 10
    split_seed = seed if preset.lora_split_seed is None else preset.lora_split_seed
    if preset.lora_split == "train_test_split" and n_val > 0:
        from datasets import Dataset

        parts = Dataset.from_list([{"i": i} for i in range(len(records))]).train_test_split(
            test_size=n_val, shuffle=True, seed=split_seed)
        train_idx, val_idx = parts["train"]["i"], parts["test"]["i"]
    else:
        order = list(range(len(records)))
        random.Random(split_seed).shuffle(order)
        train_idx, val_idx = order[n_val:], order[:n_val]
    cut = preset.lora_cutoff
    return ([tokenize_record(tokenizer, records[i], cut) for i in train_idx],
            [tokenize_record(tokenizer, records[i], cut) for i in val_idx])


def lora_procedure(preset: Preset) -> dict:
    """``run_trainer``'s options for LoRA from the preset: evaluation and checkpoint steps, the best
    checkpoint, mixed precision and the padding side (official ``lora_retrain.py`` in ``paper``)."""
    return {"save_steps": preset.retrain_save_steps, "eval_steps": preset.lora_eval_steps,
            "best_checkpoint": preset.lora_best_checkpoint, "mixed_precision": preset.lora_mixed_precision,
            "padding_side": preset.lora_padding_side}


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
    from peft import get_peft_model
    from transformers import set_seed

    preset, out_dir, model, tokenizer = start_run(model, tokenizer, out_dir, preset, overwrite, overrides)
    seed = preset.seed if seed is None else seed
    records = load_instructions(data)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError("LoRA under FSDP is not supported here: run LoRA with DDP (the adapter is small and the "
                         "base fits each device); FSDP is for continued_pretrain")
    record = getattr(model, "pruning", None)
    train_rows, val_rows = _instruction_split(tokenizer, records, preset, seed)
    set_seed(seed)  # LoRA's A matrices are drawn here
    base_print = fingerprint(model)
    peft_model = get_peft_model(model, lora_config(preset))
    steps = max_steps or preset.lora_steps
    warmup = min(preset.lora_warmup_steps, max(0, (steps or 10**9) // 10))
    trainer, seconds, work = run_trainer(
        peft_model, tokenizer, train_rows, val_rows, out_dir=out_dir, lr=preset.lora_lr,
        batch=preset.lora_batch, micro=preset.lora_micro_batch, max_steps=steps, epochs=preset.lora_epochs,
        warmup=warmup, scheduler="linear", seed=seed, resume=resume, progress=progress, callbacks=callbacks,
        name="lora", keep_checkpoints=keep_checkpoints, **lora_procedure(preset))
    adapter_tmp = work / "adapter.tmp"
    if trainer.is_world_process_zero():  # before merging: merge_and_unload strips the LoRA layers
        save_adapter(peft_model, adapter_tmp, base_print)
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
    best = trainer.state.best_model_checkpoint if preset.lora_best_checkpoint else None  # ".../checkpoint-<step>"
    info = {"method": "lora", "steps": trainer.state.global_step, "seconds": round(seconds, 2), "seed": seed,
            "kept": f"best eval loss (step {int(best.rsplit('-', 1)[1])})" if best else "last step",
            "processes": world_size(), "train_records": len(train_rows), "val_records": len(val_rows),
            "params": count_params(merged), "base": base_print, "preset": preset.name,
            "precision": precision_record(merged), **preset_settings(preset, "lora_")}
    publish(trainer, work, out_dir, overwrite, info, keep_checkpoints)
    return RetrainResult(merged, tokenizer, out_dir, "lora", trainer.state.global_step, seconds,
                         list(trainer.state.log_history))


def continued_pretrain(model, tokenizer=None, out_dir: str | os.PathLike = "retrained/cpt", preset: str | Preset = "smoke",
                       data: str | list[str] | None = None, max_steps: int | None = None, seed: int | None = None,
                       overwrite: bool = False, resume: bool = True, keep_checkpoints: bool = False,
                       progress: bool = True, callbacks=(), reference_model=None, **overrides) -> RetrainResult:
    """Full-parameter causal-LM training on packed text blocks, cosine schedule with warm-up.

    ``data`` is a dataset name (``load_texts``) or a list of texts; None = the preset's ``cpt_data``
    (the pack's C4 rows in the CPU presets, SlimPajama streamed in ``paper``, as the paper trained).
    Runs unchanged under ``torchrun``/``accelerate launch``: ``cpt_batch`` is the global batch.

    With ``cpt_dynamic_batch_loading`` (a preset field, also an override here) the training blocks
    come from the preset's ``cpt_domains`` by Sheared-LLaMA's dynamic batch loading
    (``domains.dynamic_batch_loading``): ``reference_model`` (the dense model: an object, name or dir)
    gives each domain's reference loss, the weights move every ``cpt_domain_interval`` steps and their
    history is saved as ``domain_weights.json``; ``data`` then only gives the validation blocks. A
    resumed run starts the weights again from the domains' sizes (they are not checkpointed).
    """
    preset, out_dir, model, tokenizer = start_run(model, tokenizer, out_dir, preset, overwrite, overrides)
    if preset.cpt_dynamic_batch_loading and reference_model is None:
        raise ValueError("cpt_dynamic_batch_loading needs reference_model= (CLI: --reference-model): the dense model "
                         "whose held-out loss on each domain is the loss the pruned model is drawn towards")
    data = preset.cpt_data if data is None else data
    seed, train_rows, val_rows, record = packed_text_run(model, tokenizer, data, preset, seed)
    domain_loader = None
    if preset.cpt_dynamic_batch_loading:
        from .domains import dynamic_batch_loading

        reference = load_model(reference_model)[0] if isinstance(reference_model, (str, os.PathLike)) else reference_model
        domain_loader, train_rows, callback = dynamic_batch_loading(
            tokenizer, reference, preset.cpt_domains, block_size=preset.cpt_block_size, val_blocks=preset.cpt_val_blocks,
            interval=preset.cpt_domain_interval, micro_batch=preset.cpt_micro_batch, seed=seed)
        callbacks = [*callbacks, callback]
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    trainer, seconds, work = run_on_cpt_budget(
        model, tokenizer, train_rows, val_rows, preset, out_dir=out_dir, max_steps=max_steps, seed=seed,
        resume=resume, progress=progress, callbacks=callbacks, keep_checkpoints=keep_checkpoints)
    save_trained(trainer, tokenizer, work / "final", record)
    if domain_loader is not None and trainer.is_world_process_zero():  # publish moves it into out_dir with the model
        from .domains import WEIGHTS_FILE

        atomic_write_text(work / "final" / WEIGHTS_FILE, domain_loader.history_json(preset.cpt_domain_interval))
    info = {"method": "cpt", "steps": trainer.state.global_step, "seconds": round(seconds, 2), "seed": seed,
            "processes": world_size(), "train_blocks": len(train_rows), "val_blocks": len(val_rows),
            "tokens_per_step": preset.cpt_batch * preset.cpt_block_size, "base": fingerprint(model),
            "preset": preset.name, "precision": precision_record(model), **preset_settings(preset, "cpt_")}
    publish(trainer, work, out_dir, overwrite, info, keep_checkpoints)
    trained = trainer.model
    trained.eval()
    return RetrainResult(trained, tokenizer, out_dir, "cpt", trainer.state.global_step, seconds,
                         list(trainer.state.log_history))


def cpt_then_lora(model, tokenizer=None, out_dir: str | os.PathLike = "retrained/cpt-lora",
                  preset: str | Preset = "smoke", cpt_dir: str | os.PathLike | None = None,
                  cpt_steps: int | None = None, lora_steps: int | None = None, seed: int | None = None,
                  overwrite: bool = False, resume: bool = True, progress: bool = True, **overrides) -> RetrainResult:
    """CPT (into ``cpt_dir``, default ``<out>.cpt``; reused when it already exists), then LoRA into ``out_dir``."""
    out_dir = prepare_out(out_dir, overwrite)
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
    if is_main_process():  # training.json counts both stages, so a reload reports what the chain cost
        info = json.loads((out_dir / "training.json").read_text())
        info.update(method="cpt-lora", seconds=second.seconds, lora_seconds=second.seconds - cpt_seconds,
                    cpt_seconds=cpt_seconds, cpt_dir=str(cpt_dir))
        atomic_write_text(out_dir / "training.json", json.dumps(info, indent=2, default=str) + "\n")
    return second


_TRAINING_FLAGS = ("preset", "seed", "resume")  # the budget flags every Trainer method takes from the CLI

METHODS = tuple(register_recovery(m).name for m in (
    RecoveryMethod("lora", "LoRA on instructions (the paper's recipe): adapter saved, merged model returned",
                   lora_retrain, data="alpaca", steps_field="lora_steps", cli_options=(*_TRAINING_FLAGS, "max_steps")),
    RecoveryMethod("cpt", "continued pretraining of every weight on packed plain text (rescues severe pruning)",
                   continued_pretrain, data=None, steps_field="cpt_steps",
                   cli_options=(*_TRAINING_FLAGS, "max_steps", "cpt_dynamic_batch_loading", "reference_model")),
    # its own function, not a chain: the CPT stage is reused when present and training.json sums both stages
    RecoveryMethod("cpt-lora", "CPT into <out>.cpt, then LoRA from it (the paper's best at severe ratios)",
                   cpt_then_lora, data_keyword=None, cli_options=(*_TRAINING_FLAGS, "cpt_steps", "lora_steps")),
))


def apply_adapter(model, adapter_dir: str | os.PathLike):
    """A LoRA adapter saved by ``lora_retrain`` on ``model``, refused when it belongs to another base."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / ADAPTER_DIR / "adapter_config.json").exists():
        adapter_dir = adapter_dir / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"adapter_dir={str(adapter_dir)!r} has no adapter_config.json: pass the `adapter/` "
                                "folder of a lora_retrain output")
    check_fingerprint(model, adapter_dir / BASE_FILE, f"adapter {str(adapter_dir)!r}",
                      "Apply it to the model it was trained on (same pruned blocks), or retrain LoRA on this one.")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except RuntimeError as err:  # size mismatch from load_state_dict
        raise ValueError(f"adapter {str(adapter_dir)!r} does not fit this model's shapes: {str(err)[:300]}") from None


# ---- notebook helpers -----------------------------------------------------------------------

from .pipeline import pruned_model  # noqa: E402,F401  (moved: the one pruning pipeline; notebooks import it from here)


def retrain_or_load(method: str, model, tokenizer, out_dir: str | os.PathLike, preset: str | Preset = "smoke", **kwargs):
    """Train-or-load for notebooks: ``(model, tokenizer, loss log DataFrame, training.json dict)``.

    ``out_dir`` is loaded when it already holds a finished run; otherwise ``method`` (any
    method of ``recovery.recovery_methods()``; ``teacher=`` for KD and ReplaceMe) runs into it.
    A training-free method (ReplaceMe) is finished once its model is saved; it logs no loss (an
    empty frame) and its record is the ``recovery`` entry of ``pruning.json``.
    """
    import pandas as pd

    runner = get_recovery(method)
    out_dir = Path(out_dir)
    finished = out_dir / ("training.json" if runner.trains else "config.json")
    if not finished.exists():
        result = runner(model, tokenizer, out_dir, preset=preset, **kwargs)
        model, tokenizer = result.model, result.tokenizer
    else:
        model, tokenizer = load_model(out_dir)
    if not (out_dir / "training.json").exists():  # training-free: what pruning.json says was done
        return model, tokenizer, pd.DataFrame(), json.loads((out_dir / "pruning.json").read_text())["recovery"]
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
