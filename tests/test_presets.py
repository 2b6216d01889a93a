"""Presets are ordered budgets of one recipe: cheaper presets measure less, never differently."""
from dataclasses import fields

import pytest

from shortened_llm.presets import PRESETS, get_preset

# What a preset buys: more of each makes a run slower and its numbers steadier.
BUDGETS = ("calib_samples", "eval_segments", "zero_shot_limit", "lora_steps", "cpt_steps", "shear_steps", "quant_types",
           "quant_segments")


def _budget(p, name):
    v = p.quant_table_segments if name == "quant_segments" else getattr(p, name)  # None there: eval_segments
    if v is None:
        return float("inf")  # None = the whole test set / the paper's epochs / every GGUF type
    return len(v) if isinstance(v, tuple) else v  # a tuple of GGUF types: how many are measured


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
    from shortened_llm.quant_table import DEFAULT_TYPES
    assert set(smoke.quant_types) <= set(DEFAULT_TYPES)  # a few of the types cpu measures, none of its own
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


def test_the_notebooks_demo_fields_are_cheap_only_at_tiny():
    """The fields notebooks 04-08 and their solutions read instead of branching on the preset's
    name: tiny is the only preset that cuts them (seconds per notebook); the others run the same demo."""
    demo = ("retrain_criterion", "answer_tokens", "continuation_tokens", "imatrix_samples", "quant_gen_tokens",
            "crossover_ratios", "two_process_check", "explorer_ratios", "quant_ladder")  # quant_types is a budget
    tiny, others = PRESETS["tiny"], [PRESETS[n] for n in ("smoke", "cpu", "paper")]
    assert all(getattr(p, f) == getattr(others[0], f) for p in others for f in demo)
    assert (tiny.retrain_criterion, tiny.answer_tokens, tiny.continuation_tokens) == ("magnitude+", 8, 8)
    assert tiny.quant_types == ("q8_0", "q4_0") and tiny.imatrix_samples == tiny.calib_samples
    with pytest.raises(ValueError, match="answer_tokens=0 must be >= 1"):
        get_preset("tiny", answer_tokens=0)


def test_the_quantisation_table_scores_fewer_segments_only_where_asked():
    """quant_segments=None keeps the preset's eval_segments; smoke's table scores the first 20 of its 40."""
    assert PRESETS["cpu"].quant_segments is None and PRESETS["paper"].quant_segments is None
    assert (PRESETS["smoke"].quant_table_segments, PRESETS["smoke"].eval_segments) == (20, 40)
    assert PRESETS["cpu"].quant_table_segments == PRESETS["cpu"].eval_segments == 100
    with pytest.raises(ValueError, match="quant_segments=0 must be >= 1 or None"):
        get_preset("smoke", quant_segments=0)


def test_every_preset_has_a_recovery_grid_and_a_custom_one_runs_the_papers():
    from dataclasses import replace

    from shortened_llm.lessons.grids import GRIDS, recovery_grid

    assert set(GRIDS) == set(PRESETS)
    custom = get_preset("smoke", name="mine")
    assert recovery_grid(custom) == replace(GRIDS["paper"], steps=custom.lora_steps)
    assert recovery_grid(PRESETS["tiny"]).steps == 1  # a grid's own steps win over the preset's
    cpu = recovery_grid(PRESETS["cpu"])
    assert (cpu.measured(PRESETS["cpu"]).eval_segments, cpu.measured(PRESETS["smoke"]).eval_segments) == (50, 50)
    assert recovery_grid(PRESETS["smoke"]).measured(PRESETS["smoke"]) == PRESETS["smoke"]


def test_the_grid_retrains_only_what_it_names():
    from shortened_llm.lessons.grids import GRIDS, RecoveryGrid

    smoke = GRIDS["smoke"]
    assert smoke.methods_for("bi", 0.2, 0) == ["none"]  # pruned by a criterion the grid does not retrain
    assert smoke.methods_for("reverse", 0.2, 1) == ["none"]  # only seed 0 is retrained
    assert smoke.methods_for("reverse", 0.2, 0) == ["none", "lora", "partial", "replaceme"]  # not every_method
    assert smoke.methods_for("ppl", 0.2, 0) == ["none", "lora", "partial", "kd", "replaceme", "replaceme+kd"]
    assert [job for job in smoke.pruning_jobs() if job[0] == "random"] == [("random", 0.2, s) for s in (0, 1, 2)]
    assert GRIDS["cpu"].methods_for("reverse", 0.2, 0) == ["none", "lora", "partial", "kd", "replaceme", "replaceme+lora",
                                                           "replaceme+kd"]  # every_method: all criteria
    with pytest.raises(ValueError, match="must be among criteria"):
        RecoveryGrid(criteria=("ppl",), retrain=("reverse",), combos=())
    with pytest.raises(ValueError, match="few_methods"):
        RecoveryGrid(methods=("none", "lora"), few_methods=("none", "kd"))


def test_paper_states_sheared_llamas_pruning_stage():
    """Official llmshearing/scripts/pruning.sh: 3200 steps x 32 x 4096 tokens (0.42B), lag_lr 1.0 for the
    masks and multipliers, lr 1e-4 for the weights, 640 of 3200 steps of target warm-up, updates every 50."""
    from shortened_llm.shear import PAPER_SETTINGS, ShearSettings

    paper = PRESETS["paper"]
    tokens = paper.shear_steps * paper.shear_batch * paper.shear_block_size
    assert 0.4e9 < tokens < 0.43e9
    assert ShearSettings.from_preset(paper) == PAPER_SETTINGS
    assert (PAPER_SETTINGS.mask_lr, PAPER_SETTINGS.lambda_lr, PAPER_SETTINGS.weights_lr) == (1.0, 1.0, 1e-4)
    assert PAPER_SETTINGS.target_warmup == pytest.approx(640 / 3200) and PAPER_SETTINGS.domain_interval == 50
    assert paper.cpt_domain_interval == 400 and not paper.cpt_dynamic_batch_loading


def test_shear_fields_are_checked():
    with pytest.raises(ValueError, match="shear_lambda_lr"):
        get_preset("tiny", shear_lambda_lr=0.0)
    with pytest.raises(ValueError, match="cpt_domains"):
        get_preset("tiny", cpt_dynamic_batch_loading=True, cpt_domains=("c4",))
