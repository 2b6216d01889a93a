"""Notebook 09's grid: which pruned models it retrains, with which methods, per preset.

A preset says what one measurement costs (segments, documents, steps); the grid says how
many measurements notebook 09 makes: criteria x ratios x recovery methods, with the
``random`` seeds it averages. The full grid (``paper``) is 2 ratios x 5 criteria x 7
methods; ``smoke`` and ``cpu`` retrain only the ``ppl`` and ``reverse`` models (the two the
"Reassessing Layer Pruning" claim compares), and ``tiny`` retrains nothing, since one
Trainer run of the 135M model takes longer than its whole budget.

Grids are keyed by preset name like ``presets.PRESETS``; a preset without a grid of its own
(a custom name) runs the paper's. ``recovery_grid(preset)`` returns the grid with its steps
resolved and ``grid.measured(preset)`` the preset every row of the table is measured at.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .recovery_table import RECOVERY
from ..presets import Preset, get_preset

__all__ = ["ALL_CRITERIA", "RecoveryGrid", "GRIDS", "recovery_grid"]

# the criteria notebook 09 compares: the paper's two, ShortGPT's, and the two data-free baselines
ALL_CRITERIA = ("ppl", "taylor+", "bi", "reverse", "random")


@dataclass(frozen=True)
class RecoveryGrid:
    """What notebook 09 prunes, retrains and times at one preset; change a field with
    ``dataclasses.replace(grid, steps=100)``. Validated once: a method it does not know, or a
    retrained criterion or ratio outside the pruned ones, fails here rather than mid-grid."""

    ratios: tuple[float, ...] = field(default=(0.2, 0.35), metadata={"help": "ratios every criterion prunes at"})
    criteria: tuple[str, ...] = field(default=ALL_CRITERIA, metadata={"help": "criteria that prune a model per ratio"})
    retrain: tuple[str, ...] = field(default=ALL_CRITERIA, metadata={"help": "criteria whose models are retrained "
                                                                             "(the others are measured as pruned)"})
    retrain_ratios: tuple[float, ...] = field(default=(0.2, 0.35), metadata={"help": "ratios whose models are retrained"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "seeds of `random`, averaged in the table; "
                                                                        "only seed 0 is retrained"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps of every retraining (one budget for "
                                                              "all methods); None = the preset's lora_steps"})
    contexts: tuple[int, ...] = field(default=(128, 2048), metadata={"help": "prompt lengths of the speed and "
                                                                             "KV-cache figure"})
    new_tokens: int = field(default=128, metadata={"help": "tokens generated per timed run of that figure"})
    eval_segments: int | None = field(default=None, metadata={"help": "WikiText-2 segments of every row; "
                                                                      "None = the preset's"})
    zero_shot_limit: int | None = field(default=None, metadata={"help": "documents per zero-shot task of every row; "
                                                                        "None = the preset's"})
    zero_shot: bool = field(default=True, metadata={
        "help": "measure every row's zero-shot average too (the recovery and unit tables); smoke: no, since at its "
                "20 documents a task the average moves by about 10 points from noise alone and none of 09's claims "
                "reads it, while it is most of a row's evaluation time"})
    methods: tuple[str, ...] = field(default=RECOVERY, metadata={"help": "recovery methods (recovery_table.RECOVERY) run "
                                                                         "on each retrained model"})
    combos: tuple[str, ...] = field(default=ALL_CRITERIA, metadata={"help": "criteria that also get ReplaceMe then "
                                                                            "training (a full training run more each)"})
    every_method: tuple[str, ...] = field(default=ALL_CRITERIA, metadata={
        "help": "retrained criteria that get every method in `methods`; the other retrained criteria get only "
                "`few_methods` (smoke: KD, the dearest run, only on ppl)"})
    few_methods: tuple[str, ...] = field(default=("none", "lora", "partial", "replaceme"), metadata={
        "help": "the methods of a retrained criterion outside `every_method`: enough for Lu et al.'s reverse-vs-ppl "
                "claim after LoRA, after partial fine-tuning (their recipe) and after ReplaceMe"})
    replaceme_samples: int = field(default=128, metadata={"help": "calibration samples (x 128 tokens) of the ReplaceMe "
                                                                  "section's fits"})
    # the exercises' answers (solutions/09_beyond_the_paper.ipynb)
    count_contexts: tuple[int, ...] = field(default=(128, 2048), metadata={"help": "prompt lengths of exercise 4's "
                                                                                   "equal-count speed comparison"})
    count_new_tokens: int = field(default=16, metadata={"help": "tokens generated per timed run of exercise 4"})
    cosine_steps: int = field(default=200, metadata={"help": "optimizer steps of exercise 5's cosine-objective fit"})
    fit_sample_counts: tuple[int, ...] = field(default=(32, 128), metadata={"help": "calibration samples exercise 5 "
                                                                                    "fits ReplaceMe with"})

    def __post_init__(self):
        unknown = set(self.methods) - set(RECOVERY)
        if unknown:
            raise ValueError(f"methods {sorted(unknown)} are not recovery methods; available: {', '.join(RECOVERY)}")
        if not set(self.retrain) <= set(self.criteria) or not set(self.combos) <= set(self.criteria):
            raise ValueError(f"retrain={self.retrain} and combos={self.combos} must be among criteria={self.criteria}")
        if not set(self.every_method) <= set(ALL_CRITERIA) or not set(self.few_methods) <= set(self.methods):
            raise ValueError(f"every_method={self.every_method} must be among {ALL_CRITERIA} and "
                             f"few_methods={self.few_methods} among methods={self.methods}")
        if not set(self.retrain_ratios) <= set(self.ratios):
            raise ValueError(f"retrain_ratios={self.retrain_ratios} must be among ratios={self.ratios}")

    def pruning_jobs(self) -> list[tuple[str, float, int]]:
        """``(criterion, ratio, seed)`` of every pruned model: ``random`` once per seed, the rest once."""
        return [(c, r, s) for r in self.ratios for c in self.criteria for s in (self.seeds if c == "random" else (0,))]

    def methods_for(self, criterion: str, ratio: float, seed: int) -> list[str]:
        """The recovery methods one pruned model gets: all of them for a retrained model (seed 0,
        a retrained criterion and ratio), "none" (measured as pruned) for the others; ReplaceMe
        then training only for the criteria in ``combos``; a criterion outside ``every_method`` only
        ``few_methods``."""
        retrained = criterion in self.retrain and seed == 0 and ratio in self.retrain_ratios
        allowed = self.methods if criterion in self.every_method else self.few_methods
        return [m for m in self.methods
                if m == "none" or (retrained and m in allowed and ("+" not in m or criterion in self.combos))]

    def measured(self, preset: Preset) -> Preset:
        """``preset`` with this grid's evaluation budget: every row of the table is measured the same way."""
        return get_preset(preset, eval_segments=self.eval_segments, zero_shot_limit=self.zero_shot_limit)


GRIDS: dict[str, RecoveryGrid] = {
    "tiny": RecoveryGrid(ratios=(0.2,), criteria=("ppl", "reverse", "random"), retrain=(), retrain_ratios=(), seeds=(0,),
                         steps=1, contexts=(16, 64), new_tokens=2, combos=(), replaceme_samples=8,
                         count_contexts=(16, 64), count_new_tokens=2, cosine_steps=50, fit_sample_counts=(8, 32)),
    "smoke": RecoveryGrid(ratios=(0.2,), retrain=("ppl", "reverse"), retrain_ratios=(0.2,), contexts=(128, 1024),
                          new_tokens=16, methods=tuple(m for m in RECOVERY if m != "replaceme+lora"), combos=("ppl",),
                          every_method=("ppl",), zero_shot=False),
    "cpu": RecoveryGrid(retrain=("ppl", "reverse"), retrain_ratios=(0.2,), new_tokens=16, eval_segments=50,
                        zero_shot_limit=20, combos=("ppl", "reverse")),
    "paper": RecoveryGrid(),
}


def recovery_grid(preset: Preset) -> RecoveryGrid:
    """The grid of ``preset.name`` (the paper's for a name without one), its steps resolved to
    the preset's ``lora_steps`` unless the grid fixes them."""
    grid = GRIDS.get(preset.name, GRIDS["paper"])
    return grid if grid.steps is not None else replace(grid, steps=preset.lora_steps)
