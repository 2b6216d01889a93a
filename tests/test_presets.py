"""Presets are ordered budgets of one recipe: cheaper presets measure less, never differently."""
from dataclasses import fields

import pytest

from shortened_llm.presets import PRESETS, get_preset

# What a preset buys: more of each makes a run slower and its numbers steadier.
BUDGETS = ("calib_samples", "eval_segments", "zero_shot_limit", "lora_steps", "cpt_steps")


def _budget(p, name):
    v = getattr(p, name)
    return float("inf") if v is None else v  # None = the whole test set / the paper's epochs


@pytest.mark.parametrize("cheap, dear", [("tiny", "smoke"), ("smoke", "cpu"), ("cpu", "paper")])
def test_each_preset_measures_no_more_than_the_next(cheap, dear):
    a, b = PRESETS[cheap], PRESETS[dear]
    assert all(_budget(a, f) <= _budget(b, f) for f in BUDGETS), {f: (_budget(a, f), _budget(b, f)) for f in BUDGETS}


def test_smoke_is_cpu_with_smaller_budgets_only():
    """smoke must stay the same recipe as cpu (whose numbers are in results/), only shorter."""
    smoke, cpu = PRESETS["smoke"], PRESETS["cpu"]
    differ = {f.name for f in fields(smoke) if getattr(smoke, f.name) != getattr(cpu, f.name)}
    assert differ == {"name", "ratios", *BUDGETS}
    assert set(smoke.ratios) <= set(cpu.ratios)
    # notebook 07's committed CPU sweep (results/efficiency) was run at smoke: same generation budgets
    assert (smoke.batch_sizes, smoke.new_tokens, smoke.prompt_len, smoke.repeats) == \
           (cpu.batch_sizes, cpu.new_tokens, cpu.prompt_len, cpu.repeats)


def test_cpu_preset_keeps_the_papers_calibration_and_results_segments():
    cpu = PRESETS["cpu"]
    assert (cpu.calib_samples, cpu.calib_seq_len, cpu.seed) == (10, 128, 1234)
    assert cpu.eval_segments == 100  # results/README.md: "first 100 segments"


def test_overrides_and_unknown_names():
    assert get_preset("smoke", eval_segments=7).eval_segments == 7
    with pytest.raises(ValueError, match="Available: tiny, smoke, cpu, paper"):
        get_preset("laptop")
    with pytest.raises(ValueError, match="Unknown preset field"):
        get_preset("smoke", eval_segment=7)
    with pytest.raises(ValueError, match="must be in"):
        get_preset("smoke", ratio=1.5)
