"""Training reuse: a recovery run with the same recipe on the same weights is copied, not run again.

Notebooks 04 and 09 both LoRA-retrain the 20 % PPL-pruned model at the same budget, 05 and 10
both continue pretraining the same pruned model, and notebook 09's ReplaceMe-then-KD row starts
by fitting the very maps its ReplaceMe row fitted. Each run costs minutes. Like a number in
``eval_cache``, a run is keyed by **what its result depends on**, never by a label or a path:

- the method, and every option it was called with (``max_steps=None`` spelled out as the
  preset's steps, so "the default" and "15" on a 15-step preset are one run);
- the preset, every field (the training budget, the seed, the data settings);
- the base model: its weights, config and pruning record (less the block scores, which the
  copy takes from its own base), and the tokenizer (``eval_cache``'s digests), so the same
  blocks pruned by notebook 03 and by notebook 09 share their runs;
- the teacher's weights (KD, ReplaceMe) and any model given as an option (a reference model);
- the data: the name or texts given, and the offline pack's files (path, size, time);
- the number of processes and the versions of torch, transformers and peft.

A call with an option the key cannot spell out (a callback, a path to another run, any other
object) is not looked up: it runs. The key leaves the thread count out, as the evaluation cache
does: a run on two threads and one on one give the same recipe, equal to the last bits of float
reduction order.

An entry (``kind: "training"``, in the evaluation cache's store and under its locks, so two
kernels asking for one run train it once) names the finished output dir and the digest of
every file in it. A hit checks that digest (a dir overwritten or edited since is a miss, and
the run is trained again), copies the dir to the asked-for output (hard links where the file
system allows), and returns its model with the original run's steps, seconds and peak memory:
a table of what each method costs still says what training cost, not what the copy did.
The store is on when an evaluation cache is (``eval_cache.use(run_dir)``, or
``$SHORTENED_LLM_EVAL_CACHE``, which ``reproduce`` sets for every notebook).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from . import eval_cache
from .artifacts import MANIFEST, artifact_lock, atomic_dir

__all__ = ["RUN_CONTROL", "recipe_key", "reuse_or_run", "tree_digest"]

# Options that change how a run is driven, not what it computes.
RUN_CONTROL = ("progress", "overwrite", "resume", "keep_checkpoints")


class _Unkeyable(Exception):
    """An option whose effect the key cannot spell out: the run is not looked up."""


def tree_digest(folder: str | os.PathLike) -> str:
    """SHA-256 over every file under ``folder`` (relative path and bytes), the manifest left out."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(f"{path.relative_to(folder)}|{eval_cache.file_digest(path)}|".encode())
    return h.hexdigest()


def _record_of(model) -> dict | None:
    record = getattr(model, "pruning", None)
    return None if record is None else json.loads(record.to_json())


def _model_key(model) -> dict:
    """The weights, config and dtype (``eval_cache.model_key``) and the pruning record less its
    scores: how the blocks were chosen is not what a run computes from (the same blocks scored
    on two threads differ in the last digits), and a copy gets its own base's scores back."""
    key = eval_cache.model_key(model)
    key.pop("training")  # a Trainer sets the mode itself
    record = _record_of(model)
    return {**key, "pruning": None if record is None else {k: v for k, v in record.items() if k != "scores"}}


def _pack_key() -> str | None:
    """The offline pack's files by path, size and modification time (None: no pack, the hub)."""
    from .data import data_dir

    pack = data_dir()
    if pack is None:
        return None
    files = sorted((str(p.relative_to(pack)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in Path(pack).rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def _value_key(value):
    """An option as the key spells it; ``_Unkeyable`` for what it cannot."""
    from torch import nn

    if isinstance(value, str) and os.path.exists(value):
        raise _Unkeyable(f"path {value!r}")  # what a path holds can change; its name says nothing
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_value_key(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _value_key(v) for k, v in value.items()}
    if isinstance(value, nn.Module):
        return _model_key(value)
    raise _Unkeyable(type(value).__name__)


def recipe_key(method, model, tokenizer, teacher, data, preset, options: dict) -> dict:
    """What a run of ``method`` computes from: see the module docstring. Raises ``_Unkeyable``."""
    import peft
    import torch
    import transformers

    from .trainer import world_size

    options = {k: v for k, v in options.items() if k not in RUN_CONTROL}
    if options.pop("callbacks", None):
        raise _Unkeyable("callbacks")
    if method.trains and not options.get("max_steps") and method.steps_field:
        options["max_steps"] = getattr(preset, method.steps_field)
    if isinstance(data, (list, tuple)):
        data = hashlib.sha256(json.dumps(list(data)).encode()).hexdigest()
    elif data is not None and not isinstance(data, str):
        raise _Unkeyable(type(data).__name__)
    return {"kind": "training", "method": method.name, "options": _value_key(options),
            "preset": _value_key(asdict(preset)) if preset is not None else None,
            "model": _model_key(model), "tokenizer": eval_cache.tokenizer_digest(tokenizer),
            "teacher": None if teacher is None else _model_key(teacher),
            "data": data if data is not None else method.data, "pack": _pack_key(), "processes": world_size(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__}}


def _copy_tree(source: Path, target: Path, base_record: dict | None) -> None:
    """``source``'s files into ``target``, hard-linked where the file system allows, else copied;
    its ``pruning.json`` with the fields of ``base_record`` (the asking base's) written over it."""
    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for item in source.iterdir():
        if item.name == MANIFEST:
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name, copy_function=link_or_copy)
        elif item.name == "pruning.json" and base_record is not None:
            # what the run adds to its base's record (ReplaceMe's fits) stays; the rest is this base's
            merged = {**json.loads(item.read_text()), **{k: v for k, v in base_record.items() if k != "recovery"}}
            (target / item.name).write_text(json.dumps(merged, indent=2) + "\n")
        else:
            link_or_copy(item, target / item.name)


def _from_entry(entry: dict, method, out_dir: Path, overwrite: bool, base_record: dict | None):
    """The run ``entry`` names, copied to ``out_dir`` and loaded; None when its dir is gone or changed."""
    from .models import load_model
    from .trainer import RetrainResult

    source = Path(entry["out_dir"])
    if not source.is_dir() or tree_digest(source) != entry["files"]:
        return None
    if source.resolve() != out_dir.resolve():
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            _copy_tree(source, tmp, base_record)
    model, tokenizer = load_model(out_dir)
    return RetrainResult(model, tokenizer, out_dir, method.name, entry["steps"], entry["seconds"],
                         entry.get("log", []), memory=entry.get("memory", {}), reused_from=str(source))


def reuse_or_run(method, run, model, tokenizer, out_dir, teacher, data, options: dict):
    """``run(model, tokenizer, teacher, options)``'s result, or an earlier run of the same recipe copied to ``out_dir``.

    ``options`` are the method's keywords (``preset`` and preset-field overrides among them);
    ``model``, ``tokenizer`` and ``teacher`` are loaded here when given as names (the key needs
    their weights) and handed to ``run`` loaded, the preset resolved (overrides folded in); so
    the run's seconds and peak memory are the training's, the loading left out. Without a
    store, ``run`` gets the call as it came; for a call the key cannot spell out it just runs.
    """
    store = eval_cache.active()
    if store is None or out_dir is None:
        return run(model, tokenizer, teacher, options)
    from .models import load_model
    from .trainer import resolve_model

    model, tokenizer = resolve_model(model, tokenizer)
    if isinstance(teacher, (str, os.PathLike)):
        teacher = load_model(teacher)[0]
    options, preset = _resolve_preset(method, options)
    try:
        key = recipe_key(method, model, tokenizer, teacher, data, preset,
                         {k: v for k, v in options.items() if k not in ("preset", method.data_keyword)})
    except _Unkeyable:
        return run(model, tokenizer, teacher, options)
    out_dir = Path(out_dir)
    overwrite = bool(options.get("overwrite", False))
    with artifact_lock(store.path(key)):  # a second kernel asking for this run waits, then copies it
        entry = store.get(key)
        if entry is not None:  # an existing out_dir is refused by atomic_dir, as the method itself refuses it
            found = _from_entry(entry, method, out_dir, overwrite, _record_of(model))
            if found is not None:
                print(f"{method.name}: the same run (recipe and weights) is in {found.reused_from}, trained in "
                      f"{found.seconds:.0f} s; copied to {out_dir}, not trained again")
                return found
        result = run(model, tokenizer, teacher, options)
        store.put(key, {"out_dir": str(Path(result.out_dir).resolve()), "files": tree_digest(result.out_dir),
                        "steps": result.steps, "seconds": result.seconds, "memory": result.memory,
                        "log": result.log})
    return result


def _resolve_preset(method, options: dict) -> tuple[dict, object]:
    """``options`` with the preset a training method runs with (its own default when none is
    given, preset-field overrides folded in), and that preset; a training-free one has none."""
    import inspect
    from dataclasses import fields

    from .presets import Preset, get_preset

    if not method.trains:
        return options, None
    names = {f.name for f in fields(Preset)}
    overrides = {k: v for k, v in options.items() if k in names}
    declared = inspect.signature(method.run).parameters.get("preset")  # the method's own default, else the package's
    default = declared.default if declared is not None else inspect.signature(get_preset).parameters["preset"].default
    preset = get_preset(options.get("preset", default), **overrides)
    return {**{k: v for k, v in options.items() if k not in names}, "preset": preset}, preset
