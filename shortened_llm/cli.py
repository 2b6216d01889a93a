"""``shortened-llm``: the notebooks' steps from a shell, chaining the same package calls.

    shortened-llm score --model smollm2-135m --criterion taylor --out scores.csv
    shortened-llm prune --model smollm2-135m --criterion ppl --ratio 0.2 --out runs/x/pruned
    shortened-llm eval ppl --model runs/x/pruned --dataset wikitext2 --max-segments 100
    shortened-llm eval zeroshot --model runs/x/pruned --tasks piqa boolq --limit 100
    shortened-llm retrain lora --model runs/x/pruned --out runs/x/retrained/lora --max-steps 30
    shortened-llm export gguf --model runs/x/pruned --out runs/x/pruned-q8_0.gguf --quant q8_0
    shortened-llm reproduce --preset smoke

Each subcommand is a small function; ``add_*`` functions declare its arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .artifacts import check_replaceable
from .llamacpp_guard import LlamaCppCrash
from .precision import forced_dtype, parse_dtype, precision_record
from .presets import PRESETS
from .units import UNITS

__all__ = ["main", "build_parser"]


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---- argument values: refused by argparse before any model loads ----------------------------

def _checked(parse, not_parsed: str, ok, not_ok: str):
    """An argparse ``type``: ``parse(text)``, then ``ok(value)``; each failure is one message
    (``not_parsed`` formatted with ``text``, ``not_ok`` with ``value``), so argparse prints it as it is."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(not_parsed.format(text=text)) from None
        if not ok(value):
            raise argparse.ArgumentTypeError(not_ok.format(value=value))
        return value
    return convert


def _whole(minimum: int, maximum: int | None = None):
    """An argparse ``type`` for a whole number in [minimum, maximum]."""
    bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
    return _checked(int, "{text!r} is not a whole number",
                    lambda v: minimum <= v and (maximum is None or v <= maximum), "{value} must be a whole number " + bound)


def _real(name: str, low: float, high: float, low_open: bool = True, high_open: bool = True):
    """An argparse ``type`` for a finite ``name`` in the interval from ``low`` to ``high`` (NaN and inf refused)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def inside(value: float) -> bool:
        above = low < value if low_open else low <= value
        below = value < high if high_open else value <= high
        return math.isfinite(value) and above and below
    return _checked(float, name + "={text!r} is not a number", inside, name + "={value} must be in " + interval)


def _dtype(text: str) -> str:
    """``--dtype``: auto or a dtype name; an unknown one lists the valid ones."""
    try:
        parse_dtype(text, "--dtype")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", type=_dtype, default="auto",
                   help="what the model runs in: auto (bf16 where the CPU or GPU has bf16 units, else fp32 on a CPU, "
                        "fp16 on an older GPU), float32, bfloat16 or float16; beats $SHORTENED_LLM_DTYPE and the preset")


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return text


def _blocked_by_a_file(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is a file (nothing can be written under it), else None."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def _out_file(text: str) -> str:
    """An output file: not an existing directory, and not under a file."""
    blocker = _blocked_by_a_file(Path(text))
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: {str(blocker)!r} is a file, not a folder")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory: give a file path")
    return text


def _out_dir(text: str) -> str:
    """An output directory: not under a file (one at the path itself is refused by check_replaceable)."""
    blocker = _blocked_by_a_file(Path(text))
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {str(blocker)!r} is a file, not a folder")
    return text


COUNT = _whole(1)  # steps, samples, segments, documents, batch sizes, blocks
SEQ_LEN = _whole(2)  # a segment needs a token after the first to predict
SEED = _whole(0, 2**32 - 1)  # what numpy accepts as a seed
RATIO = _real("ratio", 0, 1)  # the share of blocks to remove
ALPHA = _real("alpha", 0, 1, low_open=False, high_open=False)  # a weight between two losses
TEMPERATURE = _real("temperature", 0, math.inf)
RIDGE = _real("ridge", 0, math.inf, low_open=False)  # a share of mean diag(M^T M); 0 = plain least squares


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other error of the CLI (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


# ---- score / prune --------------------------------------------------------------------------

def _calibration(args, tokenizer, model):
    from .data import calibration_batches
    from .models import family_of
    from .presets import get_preset

    preset = get_preset(args.preset)
    return calibration_batches(
        tokenizer, n_samples=args.calib_samples or preset.calib_samples, seq_len=preset.calib_seq_len,
        seed=preset.seed, bos_every=family_of(model).bos_every,
    )


def _add_scoring_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded name, local dir or hub id")
    p.add_argument("--criterion", default="ppl",
                   help="ppl, taylor, magnitude, ... ('+' keeps the preset's keep_first / keep_last blocks, paper: "
                        f"{PRESETS['paper'].keep_first} / {PRESETS['paper'].keep_last})")
    p.add_argument("--preset", default="paper", help=f"budget preset for calibration ({', '.join(PRESETS)})")
    p.add_argument("--calib-samples", type=COUNT, default=None, help="override the preset's calibration samples")
    p.add_argument("--unit", default="block", choices=list(UNITS),  # subblock registers attn/mlp (package __init__)
                   help="what is scored/removed: whole blocks, or attention / MLP halves (ppl, sleb, bi, reverse, random)")
    _add_dtype_arg(p)  # block scoring itself runs in fp32 whatever the model's dtype


def cmd_score(args) -> int:
    from .artifacts import save_scores
    from .importance import block_importance, criterion_options, split_criterion
    from .models import load_model

    if getattr(args, "unit", "block") != "block":
        return _cmd_unit(args, prune=False)
    split_criterion(args.criterion)  # fail on a bad name before loading anything
    model, tokenizer = load_model(args.model, preset=args.preset)
    scores = block_importance(model, _calibration(args, tokenizer, model), args.criterion,
                              **criterion_options(args.criterion, args.n))
    save_scores(args.out, scores)
    _print_json({"criterion": args.criterion, "out": args.out, "scores": scores.tolist()})
    return 0


def cmd_prune(args) -> int:
    from .architectures import n_blocks_for
    from .artifacts import check_scores_fit, load_scores
    from .importance import split_criterion
    from .models import load_model, num_blocks, save_model
    from .pipeline import plus_rule, prune_model
    from .presets import get_preset
    from .prune import num_blocks_to_remove

    method, unit = getattr(args, "method", "depth"), getattr(args, "unit", "block")
    if args.n_blocks is not None and (method, unit) != ("depth", "block"):
        raise ValueError(f"--n-blocks {args.n_blocks} counts whole blocks of depth pruning: with --method "
                         f"{method} --unit {unit} give --ratio instead")
    if method == "width":
        return _cmd_width(args)
    if unit != "block":
        return _cmd_unit(args, prune=True)
    split_criterion(args.criterion)  # fail on a bad name before loading anything
    out = Path(args.out)
    check_replaceable(out, args.overwrite, flag="--overwrite")
    scores = load_scores(args.scores) if args.scores else None  # a broken CSV fails before the model loads
    preset = get_preset(args.preset)
    model, tokenizer = load_model(args.model, preset=preset)
    ratio = None if args.n_blocks is not None else args.ratio
    if ratio is None:
        n = num_blocks_to_remove(num_blocks(model), n_blocks=args.n_blocks)
    else:  # the paper preset knows the official count for the paper's models
        n = n_blocks_for(preset, model.config, ratio)
    if scores is not None:
        check_scores_fit(args.scores, scores, num_blocks(model))  # ... and one for another model, once it has
    ids = None if scores is not None else _calibration(args, tokenizer, model)
    model, removed, scores = prune_model(model, ids, args.criterion, n, ratio=ratio, scores=scores,
                                         **plus_rule(args.criterion, preset))
    save_model(model, tokenizer, out, overwrite=args.overwrite)
    _print_json({"criterion": args.criterion, "ratio": ratio, "n_blocks": n, "removed_blocks": removed,
                 "num_blocks": num_blocks(model), "out": str(out)})
    return 0


def _cmd_width(args) -> int:
    """prune --method width: thinner blocks (width.py) with as many parameters as --ratio of the blocks removed."""
    from .models import count_params, load_model, save_model
    from .width import width_prune

    out = Path(args.out)
    check_replaceable(out, args.overwrite, flag="--overwrite")
    model, tokenizer = load_model(args.model, preset=args.preset)
    before = count_params(model)
    width_prune(model, ratio=args.ratio)
    save_model(model, tokenizer, out, overwrite=args.overwrite)
    r = model.pruning
    _print_json({"method": "width", "ratio": args.ratio, "kv_groups_removed_per_block": r.kv_groups_removed,
                 "channels_removed_per_block": r.channels_removed, "params_before": before,
                 "params_after": count_params(model), "out": str(out)})
    return 0


def _cmd_unit(args, prune: bool) -> int:
    """score/prune with ``--unit attn|mlp``: halves of blocks (subblock.py); ``--ratio`` is the share of halves."""
    from .artifacts import save_scores
    from .importance import DATA_FREE, block_importance, check_criterion, criterion_options
    from .models import load_model, num_blocks, save_model
    from .pipeline import plus_rule, prune_model
    from .prune import num_blocks_for_ratio

    base = check_criterion(args.criterion, args.unit)  # before loading anything
    if prune:
        check_replaceable(args.out, args.overwrite, flag="--overwrite")
    model, tokenizer = load_model(args.model, preset=args.preset)
    ids = None if base in DATA_FREE else _calibration(args, tokenizer, model)
    if not prune:
        scores = block_importance(model, ids, base, unit=args.unit, **criterion_options(base, args.n))
        save_scores(args.out, scores)
        _print_json({"criterion": args.criterion, "unit": args.unit, "out": args.out, "scores": scores.tolist()})
        return 0
    n = num_blocks_for_ratio(num_blocks(model), args.ratio)
    # the record names the base criterion; the "+" only chooses which halves may go
    model, removed, _ = prune_model(model, ids, base, n, unit=args.unit, ratio=args.ratio,
                                    **plus_rule(args.criterion, args.preset))
    save_model(model, tokenizer, args.out, overwrite=args.overwrite)
    _print_json({"criterion": args.criterion, "unit": args.unit, "ratio": args.ratio, "removed": removed,
                 "out": str(args.out)})
    return 0


# ---- eval -----------------------------------------------------------------------------------

def cmd_eval_ppl(args) -> int:
    import time

    from .evaluate import default_bos, perplexity
    from .models import count_params, load_model

    model, tokenizer = load_model(args.model)
    bos = args.bos or default_bos(model)
    t0 = time.perf_counter()
    ppl = perplexity(model, tokenizer, args.dataset, seq_len=args.seq_len, bos=bos,
                     max_segments=args.max_segments, batch_size=args.batch_size)
    _print_json({"model": args.model, "dataset": args.dataset, "ppl": ppl, "seq_len": args.seq_len, "bos": bos,
                 "max_segments": args.max_segments, "params": count_params(model),
                 "seconds": round(time.perf_counter() - t0, 2), "precision": precision_record(model)})
    return 0


def cmd_eval_zeroshot(args) -> int:
    from .models import load_model
    from .zeroshot import PAPER_TASKS, check_tasks, zero_shot

    check_tasks(args.tasks or PAPER_TASKS)  # fail on a bad name before loading anything
    model, tokenizer = load_model(args.model)
    table = zero_shot(model, tokenizer, tasks=args.tasks or PAPER_TASKS, limit=args.limit, batch_size=args.batch_size)
    _print_json({"model": args.model, "limit": args.limit, "precision": precision_record(model),
                 "results": table.to_dict(orient="records")})
    return 0


# ---- retrain --------------------------------------------------------------------------------

# The keywords of recovery methods (``RecoveryMethod.cli_options``) whose flag has another name or
# meaning; every other keyword is read from the flag of the same name.
_RETRAIN_FLAG = {"resume": lambda a: not a.no_resume, "n_samples": lambda a: a.calibration_samples,
                 "cpt_steps": lambda a: a.max_steps, "lora_steps": lambda a: a.max_steps}


def _retrain_options(args, keys) -> dict:
    """The method's keywords from the flags; a flag left at None is left out, so the method's default holds."""
    values = {key: _RETRAIN_FLAG[key](args) if key in _RETRAIN_FLAG else getattr(args, key) for key in keys}
    return {key: value for key, value in values.items() if value is not None}


def cmd_retrain(args) -> int:
    """Any method of the recovery registry; runs unchanged under torchrun / accelerate launch."""
    from .recovery import get_recovery

    check_replaceable(args.out, args.overwrite, flag="--overwrite")  # not after hours of training
    method = get_recovery(args.method)
    if method.needs_teacher and not args.teacher:
        raise ValueError(f"retrain {method.name} needs --teacher: {method.teacher}")
    options = _retrain_options(args, method.cli_options)
    if method.data_keyword:
        options["data"] = args.data or method.data
    result = method(args.model, out_dir=args.out, teacher=args.teacher, overwrite=args.overwrite, **options)
    losses = [row["loss"] for row in result.log if "loss" in row]
    _print_json({"method": result.method, "out": str(result.out_dir), "steps": result.steps,
                 "seconds": round(result.seconds, 2), "first_loss": losses[0] if losses else None,
                 "last_loss": losses[-1] if losses else None})
    return 0



def cmd_shear(args) -> int:
    """Sheared-LLaMA's targeted structured pruning: learned masks to a target shape, then a plain smaller HF model."""
    import time

    from .families import count_params
    from .models import load_model
    from .presets import get_preset
    from .shear import save_sheared, shear_model

    if args.target_shape is not None:
        try:
            target = json.loads(args.target_shape)
        except ValueError as err:
            raise ValueError(f"--target-shape {args.target_shape!r} is not JSON ({err}): give e.g. "
                             "'{\"num_hidden_layers\": 24, \"hidden_size\": 512}'") from None
        if not isinstance(target, dict):
            raise ValueError(f"--target-shape must be a JSON object of shape keys, got {args.target_shape!r}")
    else:
        target = args.target_ratio
    preset = get_preset(args.preset, **{f"shear_{k}": getattr(args, k) for k in (
        "mask_lr", "lambda_lr", "weights_lr", "droprate_init", "target_warmup", "tolerance", "domain_interval")})
    out = Path(args.out)
    check_replaceable(out, args.overwrite, flag="--overwrite")  # not after the training
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype="float32", preset=args.preset)  # masks and weights train in fp32
    before = count_params(model)
    result = shear_model(model, tokenizer, target, steps=args.steps, preset=preset,
                         data=args.data, domains=args.domains, seed=args.seed, progress=args.progress)
    save_sheared(result, tokenizer, out, overwrite=args.overwrite, info={"model": args.model, "preset": args.preset})
    r = result.record
    _print_json({"method": "shear", "out": str(out), "target": r.target, "steps": r.steps,
                 "params_before": before, "params_after": count_params(result.model),
                 "kept_blocks": r.kept_blocks, "expected_at_end": r.expected_at_end,
                 "train_seconds": round(result.seconds, 2), "seconds": round(time.perf_counter() - t0, 2)})
    return 0

# ---- export ---------------------------------------------------------------------------------

def cmd_export_gguf(args) -> int:
    from .export import export_gguf, file_size_mb, read_gguf_metadata

    try:
        out = export_gguf(args.model, args.out, quant=args.quant, overwrite=args.overwrite)
    except (PermissionError, IsADirectoryError, ImportError, RuntimeError) as err:
        print(f"shortened-llm: error: {err}", file=sys.stderr)
        return 2
    _print_json({"out": str(out), "quant": args.quant, "size_mb": round(file_size_mb(out), 1),
                 **read_gguf_metadata(out)})
    return 0


def cmd_export_quant_table(args) -> int:
    """Every release type: size, bits per weight, PPL in llama.cpp, speed, quantise time; rows to --out as measured."""
    from .imatrix import IMATRIX_SAMPLES
    from .quant_table import DEFAULT_TYPES, quant_table

    try:
        table = quant_table(args.model, args.out, types=args.types or DEFAULT_TYPES, dense=args.dense,
                            imatrix=args.imatrix, max_segments=args.max_segments, seq_len=args.seq_len,
                            prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, repeats=args.repeats,
                            imatrix_samples=args.imatrix_samples or IMATRIX_SAMPLES,
                            work_dir=args.work_dir, keep_files=args.keep_files, progress=False)
    except (PermissionError, IsADirectoryError, ImportError, RuntimeError) as err:
        print(f"shortened-llm: error: {err}", file=sys.stderr)
        return 2
    _print_json({"out": args.out, "rows": table.round(4).to_dict(orient="records")})
    return 0


# ---- reproduce ------------------------------------------------------------------------------

def cmd_reproduce(args) -> int:
    from .reproduce import run_notebooks

    executed = run_notebooks(preset=args.preset, model=args.model, run_dir=args.run_dir,
                             only=args.only, figures_dir=args.figures_dir,
                             allow_substitute_data=args.allow_substitute_data,
                             jobs=args.jobs or min(2, os.cpu_count() or 1), force=args.force)
    _print_json({"executed": [str(p) for p in executed]})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shortened-llm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score every block and write block,score CSV")
    _add_scoring_args(p)
    p.add_argument("--out", type=_out_file, required=True, help="CSV path (columns block,score)")
    p.add_argument("--n", type=COUNT, default=None, help="blocks to remove, for criteria that need it (sleb, angular)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("prune", help="remove the least important blocks and save a plain HF model")
    _add_scoring_args(p)
    how_many = p.add_mutually_exclusive_group()
    how_many.add_argument("--ratio", type=RATIO, default=0.2,
                          help="share of blocks to remove, in (0, 1); --preset paper gives the official count "
                               "for the paper's models (e.g. 0.29 of Vicuna-13B = 11 blocks)")
    how_many.add_argument("--n-blocks", type=COUNT, default=None,
                          help="blocks to remove, instead of --ratio (the official script's 6/9/11 of LLaMA-7B)")
    p.add_argument("--method", default="depth", choices=["depth", "width"],
                   help="depth: remove blocks; width: remove KV groups and MLP channels by magnitude from every "
                        "block, as many parameters as depth pruning at --ratio (--criterion is ignored)")
    p.add_argument("--scores", type=_existing_file, default=None, help="precomputed scores CSV (skips scoring)")
    p.add_argument("--out", type=_out_dir, required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="evaluate a model")
    eval_sub = p.add_subparsers(dest="eval_command", required=True)
    q = eval_sub.add_parser("ppl", help="perplexity with the paper's protocol; prints JSON")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--dataset", default="wikitext2", choices=["wikitext2", "ptb"])
    q.add_argument("--seq-len", type=SEQ_LEN, default=128)
    q.add_argument("--bos", default=None, choices=["once", "per-segment"], help="default: the model family's")
    q.add_argument("--max-segments", type=COUNT, default=None)
    q.add_argument("--batch-size", type=COUNT, default=8)
    _add_dtype_arg(q)
    q.set_defaults(func=cmd_eval_ppl)
    q = eval_sub.add_parser("zeroshot", help="zero-shot accuracy with lm-eval (offline pack if set); prints JSON")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--tasks", nargs="+", default=None, help="default: the paper's seven tasks")
    q.add_argument("--limit", type=COUNT, default=None, help="first N documents of each task (default: all)")
    q.add_argument("--batch-size", type=COUNT, default=16)
    _add_dtype_arg(q)
    q.set_defaults(func=cmd_eval_zeroshot)

    from .recovery import recovery_methods

    p = sub.add_parser("retrain", help="LoRA, continued pretraining, or CPT then LoRA; saves a plain HF model")
    p.add_argument("method", choices=recovery_methods(cli=True))
    p.add_argument("--model", required=True, help="pruned model dir (or embedded name / hub id)")
    p.add_argument("--out", type=_out_dir, required=True, help="output model dir (appears only when training finished)")
    p.add_argument("--max-steps", type=COUNT, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--preset", default="smoke", help=f"budget preset ({', '.join(PRESETS)})")
    p.add_argument("--data", default=None, help="dataset name or JSON/JSONL file (default: alpaca for LoRA; for CPT the preset's cpt_data: c4, slimpajama in paper)")
    p.add_argument("--seed", type=SEED, default=None, help="default: the preset's seed")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in <out>.checkpoints/")
    p.add_argument("--teacher", default=None, help="kd, replaceme: the dense teacher (embedded name, dir or hub id)")
    p.add_argument("--dynamic-batch-loading", dest="cpt_dynamic_batch_loading", action="store_true", default=None,
                   help="cpt: draw blocks from the preset's cpt_domains by Sheared-LLaMA's dynamic batch loading "
                        "(needs --reference-model; weights saved as domain_weights.json)")
    p.add_argument("--reference-model", default=None, help="cpt --dynamic-batch-loading: the dense model whose "
                   "held-out loss per domain is the reference (embedded name, dir or hub id)")
    p.add_argument("--temperature", type=TEMPERATURE, default=1.0, help="kd: softmax temperature T (KL scaled by T^2)")
    p.add_argument("--alpha", type=ALPHA, default=0.0, help="kd: weight of the LM loss (the KL gets 1 - alpha)")
    p.add_argument("--hidden-loss", action="store_true", help="kd: add per-block hidden-state MSE (needs pruning.json)")
    p.add_argument("--lora", action="store_true", help="kd: train a LoRA adapter instead of every weight")
    p.add_argument("--last-k", type=COUNT, default=3, help="partial: fine-tune the last K blocks and the LM head")
    p.add_argument("--calibration-samples", type=COUNT, default=256, help="replaceme: calibration samples of 128 tokens")
    p.add_argument("--objective", choices=["lstsq", "cosine"], default="lstsq", help="replaceme: the fit's objective")
    p.add_argument("--ridge", type=RIDGE, default=0.1, help="replaceme: ridge lambda, a share of mean diag(M^T M) (0: plain least squares)")
    _add_dtype_arg(p)  # the model (and a kd/replaceme teacher) as loaded; training.json records it
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("shear", help="Sheared-LLaMA: learn masks over layers, heads, channels and hidden dims "
                                     "to a target shape; saves a plain smaller HF model")
    p.add_argument("--model", default="smollm2-135m")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-ratio", type=RATIO, default=None,
                        help="share of the parameters to remove; hidden and intermediate size shrink together")
    target.add_argument("--target-shape", default=None,
                        help="JSON of num_hidden_layers, hidden_size, num_attention_heads / num_key_value_heads, "
                             "intermediate_size (missing keys keep the model's)")
    p.add_argument("--steps", type=COUNT, default=None, help="optimizer steps of mask learning (default: the preset's "
                   "shear_steps; paper: 3200)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--preset", default="smoke", help=f"{', '.join(PRESETS)}: steps, batches, learning rates (shear_* fields)")
    p.add_argument("--data", default="c4", help="training text (a dataset name) when --domains is not given")
    p.add_argument("--domains", nargs="+", default=None,
                   help="dynamic batch loading over these datasets, e.g. bookcorpus c4 (weights saved per update)")
    p.add_argument("--seed", type=int, default=None, help="default: the preset's")
    for name, kind in (("mask-lr", float), ("lambda-lr", float), ("weights-lr", float), ("droprate-init", float),
                       ("target-warmup", float), ("tolerance", float), ("domain-interval", COUNT)):
        p.add_argument(f"--{name}", type=kind, default=None,
                       help="the preset's shear_" + name.replace("-", "_") + " (paper: Sheared-LLaMA's value)")
    p.add_argument("--progress", action="store_true", help="print every step's losses and expected shape")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_shear)

    p = sub.add_parser("export", help="export a (pruned) model for other runtimes")
    export_sub = p.add_subparsers(dest="export_command", required=True)
    q = export_sub.add_parser("gguf", help="GGUF for llama.cpp, quantised by llama.cpp; prints JSON")
    q.add_argument("--model", required=True, help="HF model dir (e.g. runs/smoke/pruned/ppl-0.20) or embedded name")
    q.add_argument("--out", type=_out_file, required=True, help="output .gguf file")
    q.add_argument("--quant", default="f16", help="f32, f16 (gguf only); q8_0, q4_k_m, ... (need the llamacpp extra)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=cmd_export_gguf)
    q = export_sub.add_parser("quant-table", help="every GGUF release type: size, bits/weight, PPL, speed; prints JSON")
    q.add_argument("--model", required=True, help="HF model dir (e.g. runs/smoke/pruned/ppl-0.20) or embedded name")
    q.add_argument("--dense", default=None, help="the model it was pruned from: its rows beside the pruned ones")
    q.add_argument("--types", nargs="+", default=None, help="default: bf16 and the 22 release types (f16 always)")
    q.add_argument("--out", default=None, help="CSV, written row by row; a rerun measures only missing rows")
    q.add_argument("--imatrix", default="both", choices=["both", "with", "without"],
                   help="K-quant / legacy rows with and/or without the importance matrix (IQ types: always with)")
    q.add_argument("--max-segments", type=COUNT, default=20, help="WikiText-2 segments for the PPL")
    q.add_argument("--seq-len", type=SEQ_LEN, default=128)
    q.add_argument("--prompt-tokens", type=COUNT, default=128, help="prompt length of the speed test")
    q.add_argument("--gen-tokens", type=COUNT, default=32, help="greedy tokens of the speed test")
    q.add_argument("--repeats", type=COUNT, default=3, help="timed runs per type (median and spread)")
    q.add_argument("--imatrix-samples", type=COUNT, default=None,
                   help="calibration windows of 128 tokens for the importance matrix (default 64)")
    q.add_argument("--work-dir", default=None, help="GGUF files (default: <out>-gguf/ beside --out)")
    q.add_argument("--keep-files", action="store_true", help="keep every quantised file (default: f16 + imatrix only)")
    q.set_defaults(func=cmd_export_quant_table)

    p = sub.add_parser("reproduce", help="run every notebook with papermill (figures/ and runs/)")
    p.add_argument("--preset", default="smoke", help=f"{', '.join(PRESETS)}; cpu takes hours, see the README")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--run-dir", default=None, help="default: runs/<preset>")
    p.add_argument("--figures-dir", default="figures", help="where the run's figures are copied")
    p.add_argument("--only", nargs="*", default=None, help="notebook name prefixes, e.g. 01 03")
    p.add_argument("--allow-substitute-data", action="store_true",
                   help="let --preset paper run on the offline pack's stand-ins (every output then says so)")
    p.add_argument("--jobs", type=COUNT, default=None,
                   help="notebooks side by side, each after those it reuses, the cores split between them "
                        "(default: 2 where there are 2 cores or more; 1 = one after another)")
    p.add_argument("--force", action="store_true",
                   help="run every notebook again, also those an earlier (perhaps interrupted) run finished")
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a value argparse refused: its exit code, returned like any other
        return stop.code
    try:
        with forced_dtype(getattr(args, "dtype", None)):  # --dtype reaches the loads inside the package too
            return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, IndexError, KeyError, LlamaCppCrash) as err:
        print(f"shortened-llm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
