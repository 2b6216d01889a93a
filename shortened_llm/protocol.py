"""The protocol card: every setting a run used, the official value beside it, and "same" / "differs: why".

The official protocol is the one of the paper's code (Nota-NetsPresso/shortened-llm, built on
LLM-Pruner and lm-eval 3326c54) and, for continued pretraining, the authors' model cards of the
CPT models. ``OFFICIAL`` holds it as data, one ``Setting`` per row, grouped by the eight points of
issue 21 (0: the settings that already matched). ``protocol_card(preset, config)`` reads what a
preset would run for a model config and compares; ``write_protocol`` puts it in a run dir as
``protocol.json``, so a number in that dir can always be read against the paper's with its
differences named.

A row is ``controlled`` when the preset decides it; ``paper`` then says "same" for every
controlled row of the paper's models (tests/test_protocol.py). The others depend on where the
run happens: the data on disk (the offline pack's stand-ins), a GPU (fp16 AMP), the hours a
budget buys; they say why they differ as well.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .architectures import architecture_config, architecture_names, official_counts, removal_counts
from .artifacts import atomic_write_text
from .data import DATASETS, PACK_STANDINS, check_original_data, standins_in_use
from .families import FAMILIES
from .presets import PAPER_BLOCK_COUNTS, Preset, get_preset

__all__ = ["PROTOCOL_FILE", "Setting", "OFFICIAL", "RunContext", "protocol_card", "write_protocol", "model_config"]

PROTOCOL_FILE = "protocol.json"
SUBSTITUTE_DATA = "substitute data"  # what every output of a run on the pack's stand-ins says

# Point 8, established by tests/test_protocol.py::test_fast_and_slow_llama_tokenizers_agree...: on a
# sentencepiece model with LLaMA's trainer settings, the fast tokenizer gives the slow one's ids on the
# calibration rows and the joined PPL texts; they differ only on a text that starts with a space.
FAST_TOKENIZER_IDS_AGREE = True


@dataclass(frozen=True)
class RunContext:
    """Where the run happens: what a preset does not decide."""

    cuda: bool  # fp16 AMP needs it
    standins: dict  # data.standins_in_use(): {name: what the pack substitutes}
    dtype: str = "float32"  # what models load in (precision.choose_dtype): a bf16 one trains under bf16 autocast


@dataclass(frozen=True)
class Setting:
    """One row: the official value, how to read ours from (preset, config, context), and why they differ."""

    point: int  # issue 21's point (0 = matched before it)
    name: str
    official: Callable  # (config) -> value; None: the official code has no value for this model
    ours: Callable  # (preset, config, context) -> value
    why: str  # why ours differs when it does: the preset's deliberate choice, or what the environment lacks
    controlled: bool = True  # False: the environment or the budget decides, not the preset


def _const(value):
    return lambda *_: value


def _official_blocks(config):
    counts = official_counts(Preset(block_counts=PAPER_BLOCK_COUNTS), config)
    return sorted({c.n_blocks for c in counts}) or None


def _taylor_dtype(preset, config, ctx):
    import inspect

    from .importance import block_importance

    return "float32" if inspect.signature(block_importance).parameters["fp32"].default else "the model's dtype"


def _zero_shot_bos(preset, config, ctx):
    return FAMILIES[config.model_type].zero_shot_bos if config.model_type in FAMILIES else None


# The official harness: no BOS for the LLaMA-style families, BOS for Gemma (its *_yesBOS scripts)
_OFFICIAL_BOS = {"llama": False, "mistral": False, "gemma": True}


def _split(preset, config, ctx):
    seed = preset.seed if preset.lora_split_seed is None else preset.lora_split_seed
    return f"{preset.lora_split}(test_size={preset.lora_val_size}, seed={seed})"


def _mixed_precision(preset, config, ctx):
    """What ``trainer.master_weights`` decides, by the same rule (``precision.training_autocast``)."""
    import torch

    from .precision import training_autocast

    autocast = training_autocast(getattr(torch, ctx.dtype), preset.lora_mixed_precision, ctx.cuda)
    return {torch.float16: "fp16", torch.bfloat16: "bf16 autocast", None: "fp32"}[autocast]


def _hub_id(name: str) -> str:
    return "/".join(DATASETS[name].hub) if name in DATASETS else name


def _data(name: str, original: str):
    return lambda preset, config, ctx: PACK_STANDINS[name] if name in ctx.standins else original


_LLAMA_TOKENIZED = ("llama",)  # the families the official code loads LLaMA's sentencepiece tokenizer for


def _tokenizer(preset, config, ctx):
    if config.model_type not in _LLAMA_TOKENIZED:
        return "the model's own"
    return "slow (sentencepiece) ids" if FAST_TOKENIZER_IDS_AGREE else "fast (tokenizers) ids, not the slow one's"


def _budget_tokens(preset, config, ctx):
    spec = DATASETS.get(preset.cpt_data)
    if preset.cpt_steps is not None:
        return f"{preset.cpt_steps * preset.cpt_batch * preset.cpt_block_size:,} tokens ({preset.cpt_steps} steps)"
    if spec is not None and spec.stream_rows is not None:
        return f"1 epoch of the first {spec.stream_rows:,} streamed rows"
    return f"1 epoch of {preset.cpt_data}"


_CPU = "a cheaper budget (the CPU presets')"
OFFICIAL: tuple[Setting, ...] = (
    # 0. matched before issue 21
    Setting(0, "calibration samples x tokens", _const((10, 128)), lambda p, c, x: (p.calib_samples, p.calib_seq_len),
            f"{_CPU}: fewer or shorter samples"),
    Setting(0, "calibration seed", _const(1234), lambda p, c, x: p.seed, "another seed"),
    Setting(0, "'+' rule: first / last blocks kept", _const((4, 2)), lambda p, c, x: (p.keep_first, p.keep_last),
            "another rule"),
    Setting(0, "PPL segment tokens", _const(128), lambda p, c, x: p.eval_seq_len, f"{_CPU}: shorter segments"),
    Setting(0, "PPL segments", _const("all"), lambda p, c, x: "all" if p.eval_segments is None else p.eval_segments,
            f"{_CPU}: the first segments only"),
    Setting(0, "zero-shot documents per task", _const("all"),
            lambda p, c, x: "all" if p.zero_shot_limit is None else p.zero_shot_limit, f"{_CPU}: the first documents"),
    Setting(0, "zero-shot tasks", _const("the paper's seven"),
            lambda p, c, x: "the paper's seven" if p.zero_shot_tasks is None else ", ".join(p.zero_shot_tasks),
            f"{_CPU}: fewer tasks"),
    Setting(0, "LoRA r / alpha / dropout", _const((8, 16, 0.05)), lambda p, c, x: (p.lora_rank, p.lora_alpha, p.lora_dropout),
            "other adapter sizes"),
    Setting(0, "LoRA target projections", _const(7), lambda p, c, x: len(p.lora_targets), "fewer projections"),
    Setting(0, "LoRA length", _const("2 epochs"),
            lambda p, c, x: f"{p.lora_epochs:g} epochs" if p.lora_steps is None else f"{p.lora_steps} steps",
            f"{_CPU}: a fixed number of steps"),
    Setting(0, "LoRA lr / global batch / micro-batch / cutoff", _const((1e-4, 64, 4, 256)),
            lambda p, c, x: (p.lora_lr, p.lora_batch, p.lora_micro_batch, p.lora_cutoff),
            f"{_CPU}: smaller batches, and a 30x larger lr so that a few steps can move"),
    Setting(0, "LoRA warm-up steps", _const(100), lambda p, c, x: p.lora_warmup_steps, "another warm-up"),
    # 1. block counts
    Setting(1, "blocks removed", _official_blocks, lambda p, c, x: removal_counts(p, c),
            "round(ratio x blocks) for the preset's ratios, not the official script's counts"),
    # 2. Taylor in fp32
    Setting(2, "Taylor gradients in", _const("float32"), _taylor_dtype, "gradients in the model's dtype"),
    # 3. zero-shot BOS
    Setting(3, "zero-shot BOS", lambda c: _OFFICIAL_BOS.get(c.model_type), _zero_shot_bos,
            "the family table's zero_shot_bos differs from the official harness"),
    # 4. the LoRA procedure
    Setting(4, "LoRA evaluation every", _const(100), lambda p, c, x: p.lora_eval_steps or "start and end only",
            f"{_CPU}: evaluation only before the first and after the last step"),
    Setting(4, "LoRA checkpoint every", _const(200), lambda p, c, x: p.retrain_save_steps, f"{_CPU}: fewer checkpoints"),
    Setting(4, "LoRA model kept", _const("best eval loss"),
            lambda p, c, x: "best eval loss" if p.lora_best_checkpoint else "last step", f"{_CPU}: the last step"),
    Setting(4, "LoRA held-out split", _const("train_test_split(test_size=2000, seed=42)"), _split,
            f"{_CPU}: a seeded shuffle, fewer records held out"),
    Setting(4, "LoRA padding side", _const("left"), lambda p, c, x: p.lora_padding_side, f"{_CPU}: right padding"),
    Setting(4, "LoRA precision", _const("fp16"), _mixed_precision,
            "fp16 mixed precision runs on CUDA only (none here) or the preset trains without it: in fp32, or "
            "under bf16 autocast over fp32 master weights where models load in bf16", controlled=False),
    # 5. CPT
    Setting(5, "CPT corpus", _const("cerebras/SlimPajama-627B"), lambda p, c, x: _hub_id(p.cpt_data),
            f"{_CPU}: the pack's 1000 C4 rows"),
    Setting(5, "CPT AdamW weight decay / beta2", _const((0.1, 0.95)),
            lambda p, c, x: (p.cpt_weight_decay, p.cpt_adam_beta2), f"{_CPU}: no decay, torch's beta2"),
    Setting(5, "CPT global batch (sequences)", _const(512), lambda p, c, x: p.cpt_batch, f"{_CPU}: small batches"),
    Setting(5, "CPT token budget", _const("37B tokens for the 20% pruned Vicuna-7B (authors' model card; "
                                          "not confirmed from the paper text)"), _budget_tokens,
            "days on 8 H100s; set cpt_steps or DATASETS['slimpajama'].stream_rows for more", controlled=False),
    # 6. efficiency
    Setting(6, "timing prompt", _const("The Leaning Tower of Pisa is known for"),
            lambda p, c, x: p.timing_prompt or f"{p.prompt_len} random token ids", f"{_CPU}: random token ids"),
    Setting(6, "timing batch sizes", _const((1, 8, 16, 32, 64, 128, 256)), lambda p, c, x: tuple(p.batch_sizes),
            f"{_CPU}: fewer, smaller batches"),
    Setting(6, "timing output tokens (forced)", _const((128, 512)), lambda p, c, x: tuple(p.new_tokens),
            f"{_CPU}: shorter outputs"),
    Setting(6, "timing decoding", _const("sampling top-k 50, top-p 0.95"),
            lambda p, c, x: f"sampling top-k {p.timing_top_k}, top-p {p.timing_top_p:g}" if p.timing_sampling
            else "greedy", f"{_CPU}: greedy"),
    Setting(6, "timing dtype", _const("float16"), lambda p, c, x: p.timing_dtype or "as loaded",
            f"{_CPU}: the dtype the model was loaded in"),
    Setting(6, "timing KV cache", _const("on"), _const("on"), "off"),
    Setting(6, "timing runs: warm-up + timed", _const((10, 20)), lambda p, c, x: (p.timing_warmup, p.repeats),
            f"{_CPU}: 1 warm-up and 5 timed runs"),
    Setting(6, "timing call order", _const("each model's runs in a row"),
            lambda p, c, x: "one call per model in turn" if p.timing_interleave else "each model's runs in a row",
            f"{_CPU}: interleaved, so another job's busy spell hits every model alike"),
    Setting(6, "timing statistic", _const("mean"), lambda p, c, x: p.timing_statistic,
            f"{_CPU}: the median, steadier on a shared CPU"),
    Setting(6, "timing VRAM", _const("max_memory_allocated"), _const("max_memory_allocated"), "another counter"),
    Setting(6, "GPU utilisation sampled every (s)", _const(0.5), lambda p, c, x: p.gpu_util_period,
            f"{_CPU}: finer sampling"),
    # 7. substitute data
    Setting(7, "calibration data", _const("BookCorpus"), _data("bookcorpus", "BookCorpus"),
            "the offline pack's stand-in (substitute data)", controlled=False),
    Setting(7, "HellaSwag", _const("HellaSwag"), _data("hellaswag", "HellaSwag"),
            "the offline pack's stand-in (substitute data)", controlled=False),
    # 8. tokenizers
    Setting(8, "LLaMA tokenizer ids", lambda c: "slow (sentencepiece) ids" if c.model_type in _LLAMA_TOKENIZED
            else "the model's own", _tokenizer, "the fast tokenizer's ids differ from sentencepiece's"),
)


def model_config(model: str):
    """The config a card is built for: a shipped architecture's name, else a model name / dir's config.json."""
    if model in architecture_names():
        return architecture_config(model)
    from transformers import AutoConfig

    from .models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(model))


def _architecture(config) -> str | None:
    """The shipped architecture ``config`` has the shape of (the paper's models), if any."""
    for c in PAPER_BLOCK_COUNTS:
        if official_counts(Preset(block_counts=(c,)), config):
            return c.architecture
    return None


def protocol_card(preset: str | Preset, config, *, cuda: bool | None = None, standins: dict | None = None,
                  dtype: str | None = None) -> dict:
    """The card of ``preset`` on a model of ``config``: one row per ``OFFICIAL`` setting.

    ``cuda`` (default: whether this machine has it), ``standins`` (default:
    ``data.standins_in_use()``) and ``dtype`` (default: what ``precision.choose_dtype`` picks for
    the preset here) describe where the run happens. A row's ``status`` is "same",
    "differs: why" or "n/a: why" (the official code has no value for this model).
    """
    import torch

    from .precision import choose_dtype

    preset = get_preset(preset)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if dtype is None:  # what this machine would load in; for a CUDA card written without CUDA it is unknown: fp32
        dtype = (choose_dtype(preset=preset, device="cuda" if cuda else "cpu", announce=False).name
                 if cuda == torch.cuda.is_available() else "float32")
    ctx = RunContext(cuda=cuda, standins=standins_in_use() if standins is None else dict(standins), dtype=dtype)
    rows = []
    for s in OFFICIAL:
        official, ours = s.official(config), s.ours(preset, config, ctx)
        if official is None:
            status = "n/a: the official code has no value for this model"
        else:
            status = "same" if _plain(ours) == _plain(official) else f"differs: {s.why}"
        rows.append({"point": s.point, "setting": s.name, "ours": _plain(ours), "official": _plain(official),
                     "status": status, "controlled": s.controlled})
    return {"preset": preset.name, "model_type": config.model_type, "architecture": _architecture(config),
            "num_blocks": config.num_hidden_layers, "substitute_data": bool(ctx.standins),
            "data_note": SUBSTITUTE_DATA if ctx.standins else "", "rows": rows}


def _plain(value):
    """JSON's view of a value (tuples become lists), so a card compares as it reads back."""
    return json.loads(json.dumps(value))


def write_protocol(run_dir: str | os.PathLike, preset: str | Preset, config, **context) -> Path:
    """``protocol.json`` in ``run_dir``, written atomically; refuses ``paper`` on stand-in data unless allowed.

    ``context`` is ``protocol_card``'s (``cuda``, ``standins``).
    """
    preset = get_preset(preset)
    if "standins" not in context:
        context["standins"] = check_original_data(preset)
    path = Path(run_dir) / PROTOCOL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(protocol_card(preset, config, **context), indent=2) + "\n")
    return path
