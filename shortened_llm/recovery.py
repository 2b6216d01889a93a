"""One registry of recovery methods: what can retrain (or repair) a pruned model, and how to call each one.

After peft's ``register_peft_method``: a method is a small ``RecoveryMethod`` entry, registered
once by the module that implements it (``retrain.py``: lora, cpt, cpt-lora; ``distill.py``:
kd, partial; ``replaceme.py``: replaceme). A composite (``replaceme+lora``, ``replaceme+kd``)
is only data here: the methods it chains, each stage starting from the last one's output.
Everything that picks a method by name reads this table: the ``retrain`` CLI command (its
choices and its dispatch), ``retrain.retrain_or_load`` and notebook 09's ``lessons.recovery_table.recover``.

The methods' own functions keep their signatures; ``RecoveryMethod.__call__`` is the one
calling convention on top, ``method(model, tokenizer, out_dir, teacher=..., data=..., **options)``:
the teacher goes where the method takes it, the dataset under the method's keyword, and
a training-free method is not handed the training budget (``TRAINING_OPTIONS``).

This module imports no method at import time: the methods import it to register, so it sits
below them all. A lookup first loads the modules named in ``PROVIDERS`` (``importlib``, once), so
``get_recovery("kd")`` works whichever module the caller happened to import: the registry
finds its providers by name, as lm-eval's finds its task files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .registry import Registry

__all__ = ["RecoveryMethod", "RECOVERY_METHODS", "PROVIDERS", "TRAINING_OPTIONS", "register_recovery", "get_recovery",
           "recovery_methods"]

# The modules that register methods, in the order listings show them (the paper's three first): the
# order of the CLI's choices must not depend on which module some earlier import happened to load first.
PROVIDERS = ("retrain", "distill", "replaceme")

# Keywords only a method that trains takes: a training-free stage of a composite (ReplaceMe) runs without them.
TRAINING_OPTIONS = ("preset", "max_steps", "resume", "keep_checkpoints", "callbacks")


@dataclass(frozen=True)
class RecoveryMethod:
    """One recovery method: its name, the function that runs it, and what it needs.

    ``run`` is called as ``run(model, [teacher,] tokenizer, out_dir=..., **options)`` and returns
    a ``trainer.RetrainResult``; a composite has no ``run``, only ``chain``.
    """

    name: str
    description: str  # one line, for listings and the docs
    run: Callable | None = None
    teacher: str = ""  # what the teacher must be, said when it is missing; "" = the method needs none
    data: str | None = None  # default dataset (None: the method takes none, or each stage its own)
    data_keyword: str | None = "data"  # the keyword ``run`` takes the dataset as (None: it takes none)
    trains: bool = True  # False: training-free (no preset budget, no steps, no loss log)
    cli_options: tuple[str, ...] = ()  # keywords of ``run`` the CLI fills from its flags (beyond out, overwrite)
    chain: tuple[str, ...] = ()  # a composite: the methods it runs, in order
    steps_field: str | None = None  # the preset field ``max_steps=None`` means (``train_cache`` spells it out)

    @property
    def needs_teacher(self) -> bool:
        """A composite needs one when any stage does (ReplaceMe's fit compares with the dense model)."""
        return bool(self.teacher) or any(get_recovery(stage).needs_teacher for stage in self.chain)

    @property
    def on_cli(self) -> bool:
        """A composite is a notebook-09 row, not a ``retrain`` command: the CLI lists single methods."""
        return not self.chain

    def __call__(self, model, tokenizer=None, out_dir=None, *, teacher=None, data=None,
                 stage_dirs: dict | None = None, **options):
        """Run the method (a composite: each stage in turn); return the last stage's ``RetrainResult``.

        ``teacher`` is passed only to a method that takes one. A composite writes stage ``s``
        to ``stage_dirs[s]`` (default ``<out>.<s>``), starts each stage from the dir the last one
        saved, and its result counts the seconds of all stages.
        """
        if self.chain:
            return self._run_chain(model, tokenizer, out_dir, teacher, data, stage_dirs or {}, options)
        if self.teacher and teacher is None:
            raise ValueError(f"recovery method {self.name!r} needs teacher=: {self.teacher}")
        if data is not None:
            if self.data_keyword is None:
                raise ValueError(f"recovery method {self.name!r} takes no dataset (data={data!r}): "
                                 "each of its stages reads its own")
            options[self.data_keyword] = data
        if not self.trains:
            options = {k: v for k, v in options.items() if k not in TRAINING_OPTIONS}
        from .efficiency import track_peak_memory
        from .train_cache import reuse_or_run

        def run(model, tokenizer, teacher, options):
            head = (model, teacher, tokenizer) if self.teacher else (model, tokenizer)
            with track_peak_memory() as memory:
                result = self.run(*head, out_dir=out_dir, **options)
            result.memory = memory
            return result

        return reuse_or_run(self, run, model, tokenizer, out_dir, teacher if self.teacher else None, data, options)

    def _run_chain(self, model, tokenizer, out_dir, teacher, data, stage_dirs, options):
        out_dir = Path(out_dir)
        seconds, result, memories = 0.0, None, []
        for i, name in enumerate(self.chain):
            last = i == len(self.chain) - 1
            stage_out = out_dir if last else Path(stage_dirs.get(name, out_dir.with_name(f"{out_dir.name}.{name}")))
            result = get_recovery(name)(model, tokenizer, stage_out, teacher=teacher, data=data if last else None,
                                        **options)
            model, tokenizer, seconds = str(stage_out), None, seconds + result.seconds
            memories.append(result.memory)
        result.method, result.seconds = self.name, seconds
        if all(memories):  # the chain's peak over its stages, its growth over the level before the first
            peak, before = max(m["peak_mb"] for m in memories), memories[0]["before_mb"]
            result.memory = {**memories[0], "peak_mb": peak, "growth_mb": peak - before}
        return result


def _runs_or_chains(method: RecoveryMethod) -> None:
    if (method.run is None) == (not method.chain):
        raise ValueError(f"recovery method {method.name!r}: give it either run= or chain=, not both or neither")


RECOVERY_METHODS: dict[str, RecoveryMethod] = {}
_REGISTRY = Registry("recovery method", RECOVERY_METHODS, __package__, PROVIDERS, check=_runs_or_chains)


def register_recovery(method: RecoveryMethod) -> RecoveryMethod:
    """Add ``method`` to the registry; a second method under the same name is refused, not shadowed."""
    return _REGISTRY.register(method)


def get_recovery(name: str) -> RecoveryMethod:
    """The registered method ``name``; an unknown one gets the package's one "did you mean" error."""
    return _REGISTRY.get(name)


def recovery_methods(cli: bool = False) -> tuple[str, ...]:
    """Registered names, grouped by ``PROVIDERS`` (each module's in its own order, composites last);
    ``cli=True``: the CLI's choices."""
    return tuple(m.name for m in _REGISTRY.listed() if m.on_cli or not cli)


# ---- composites: chains of registered methods, declared as data --------------------------------

register_recovery(RecoveryMethod(
    "replaceme+lora", "ReplaceMe's training-free maps, then LoRA on instructions from the replaced model",
    chain=("replaceme", "lora")))
register_recovery(RecoveryMethod(
    "replaceme+kd", "ReplaceMe's training-free maps, then KD from the dense teacher on the replaced model",
    chain=("replaceme", "kd")))
