"""Block importance: every criterion on a tiny random Llama, with known answers where there are some."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from conftest import make_tiny_llama
from shortened_llm.evaluate import token_nll
from shortened_llm.importance import (
    CRITERIA, PLUS_RULE, block_importance, blocks_to_remove, criterion_options, removal_order,
    split_criterion, to_remove,
)
from shortened_llm.prune import remove_blocks

ALL = sorted(CRITERIA)


def _score(model, ids, criterion, **kw):
    """Every criterion takes progress=, the instant ones included: one call shape for all."""
    return block_importance(model, ids, criterion, **{"progress": False, **kw})


def test_an_option_a_criterion_does_not_take_is_a_clear_error(tiny_llama, random_ids):
    with pytest.raises(ValueError, match=r"'magnitude' takes no option\(s\) \['n'\]; it takes: none"):
        block_importance(tiny_llama, None, "magnitude", n=3)
    with pytest.raises(ValueError, match="it takes: .*batch_size.*progress"):
        block_importance(tiny_llama, random_ids, "ppl", temperature=2.0)


def test_every_expected_criterion_is_registered():
    assert {"ppl", "taylor", "magnitude", "bi", "angular", "sleb", "reverse", "random"} <= set(CRITERIA)


@pytest.mark.parametrize("criterion", ALL)
def test_shape_finite_and_deterministic(criterion, random_ids):
    model = make_tiny_llama(num_layers=5)
    a = _score(model, random_ids, criterion)
    b = _score(make_tiny_llama(num_layers=5), random_ids, criterion)
    assert a.shape == (5,) and a.dtype == torch.float64
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_taylor_leaves_model_as_it_was(tiny_llama, random_ids):
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    plain = _score(tiny_llama, random_ids, "taylor")
    assert [p.requires_grad for p in tiny_llama.parameters()] == flags
    assert all(p.grad is None for p in tiny_llama.parameters())
    # checkpointing recomputes activations, same gradients; batching accumulates to the same mean loss
    assert torch.allclose(_score(tiny_llama, random_ids, "taylor", gradient_checkpointing=True), plain, rtol=1e-5)
    assert torch.allclose(_score(tiny_llama, random_ids, "taylor", batch_size=1), plain, rtol=1e-4)


def test_taylor_matches_manual_sum_of_w_times_grad(tiny_llama, random_ids):
    model = copy.deepcopy(tiny_llama)
    logits = model(random_ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), random_ids[:, 1:].flatten())
    loss.backward()
    want = [sum((p * p.grad).abs().sum().item() for name, p in b.named_parameters() if name.endswith("weight"))
            for b in model.model.layers]
    assert torch.allclose(_score(tiny_llama, random_ids, "taylor"), torch.tensor(want, dtype=torch.float64), rtol=1e-4)


def test_ppl_fast_equals_naive(random_ids):
    model = make_tiny_llama(num_layers=6)
    fast = _score(model, random_ids, "ppl", reuse_prefix=True)
    naive = _score(model, random_ids, "ppl", reuse_prefix=False)
    assert ((fast - naive).abs() / naive).max() <= 1e-4
    assert torch.allclose(_score(model, random_ids, "ppl", batch_size=2), fast, rtol=1e-5)


@pytest.mark.parametrize("block", [0, 2, 3])  # first, middle, last (the last has no successor to inject into)
def test_ppl_score_is_ppl_of_the_really_pruned_model(block, random_ids):
    model = make_tiny_llama(num_layers=4)
    scores = _score(model, random_ids, "ppl")
    pruned = remove_blocks(copy.deepcopy(model), [block])
    want = math.exp(token_nll(pruned, random_ids).double().mean().item())
    assert scores[block].item() == pytest.approx(want, rel=1e-5)


def test_bi_is_one_minus_cosine_of_block_in_and_out(tiny_llama, random_ids):
    out = tiny_llama(random_ids, output_hidden_states=True)
    h = out.hidden_states  # the last one is after the final norm: compare blocks 0..L-2 only
    want = [1 - torch.cosine_similarity(h[i], h[i + 1], dim=-1).mean().item() for i in range(len(h) - 2)]
    got = _score(tiny_llama, random_ids, "bi")
    assert torch.allclose(got[:-1], torch.tensor(want, dtype=torch.float64), atol=1e-5)


def test_angular_span_parameter(tiny_llama, random_ids):
    one, two = _score(tiny_llama, random_ids, "angular", n=1), _score(tiny_llama, random_ids, "angular", n=2)
    assert (one >= 0).all() and (one <= 1).all()
    assert not torch.allclose(one, two)
    with pytest.raises(ValueError, match="n=9"):
        _score(tiny_llama, random_ids, "angular", n=9)


def test_angular_removal_is_gromovs_span(tiny_llama, random_ids):
    """The n lowest-scored blocks are the contiguous span of n blocks whose ends differ least in angle."""
    from shortened_llm.models import get_blocks

    blocks = get_blocks(tiny_llama)
    states = {}

    def keep_input(i):
        def hook(module, args, kwargs):
            states[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def keep_output(module, args, out):
        states[len(blocks)] = out[0] if isinstance(out, tuple) else out

    hooks = [b.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, b in enumerate(blocks)]
    hooks.append(blocks[-1].register_forward_hook(keep_output))
    with torch.no_grad():
        tiny_llama(random_ids, use_cache=False)
    for h in hooks:
        h.remove()
    L = len(blocks)
    for n in (1, 2, 3):
        cos = [torch.cosine_similarity(states[s], states[s + n], dim=-1).clamp(-1, 1) for s in range(L - n + 1)]
        angle = torch.stack([(torch.arccos(c) / math.pi).double().mean() for c in cos])
        start = int(torch.argmin(angle))
        scores = _score(tiny_llama, random_ids, "angular", n=n)
        assert blocks_to_remove(scores, n) == list(range(start, start + n))
        assert scores.min().item() == pytest.approx(angle[start].item(), rel=1e-6)


def test_sleb_first_step_is_the_ppl_minimum_and_order_is_consistent(random_ids):
    model = make_tiny_llama(num_layers=5)
    ppl = _score(model, random_ids, "ppl")
    sleb = _score(model, random_ids, "sleb", n=3)
    assert removal_order(sleb)[0] == int(torch.argmin(ppl))
    assert sorted(sleb[removal_order(sleb)[:3]].tolist()) == [0, 1, 2]
    # second greedy step: the block whose removal, on top of the first, hurts least
    first = removal_order(sleb)[0]
    pruned = remove_blocks(copy.deepcopy(model), [first])
    second_scores = _score(pruned, random_ids, "ppl")
    alive = [i for i in range(5) if i != first]
    assert removal_order(sleb)[1] == alive[int(torch.argmin(second_scores))]
    with pytest.raises(ValueError, match="n=5"):
        _score(model, random_ids, "sleb", n=5)


def test_baselines(tiny_llama):
    assert removal_order(block_importance(tiny_llama, None, "reverse")) == [3, 2, 1, 0]
    r0 = block_importance(tiny_llama, None, "random", seed=0)
    assert sorted(r0.tolist()) == [0, 1, 2, 3]
    assert torch.equal(r0, block_importance(tiny_llama, None, "random", seed=0))


def test_magnitude_known_answer(tiny_llama):
    with torch.no_grad():
        for p in tiny_llama.model.layers[2].parameters():
            p.fill_(0.0)
    scores = block_importance(tiny_llama, None, "magnitude")
    assert scores[2] == 0 and (scores[[0, 1, 3]] > 0).all()


def test_blocks_to_remove_and_plus_rule():
    scores = torch.tensor([0.0, 1.0, 2.0, 9.0, 3.0, 8.0, 4.0, 5.0, 6.0, 7.0])
    assert blocks_to_remove(scores, 3) == [0, 1, 2]
    assert blocks_to_remove(scores, 3, **PLUS_RULE) == [4, 6, 7]  # blocks 0-3 and 8-9 protected
    assert split_criterion("taylor+") == ("taylor", True)
    with pytest.raises(ValueError, match=r"n=5 blocks to remove but only 4 of 10 are removable"):
        blocks_to_remove(scores, 5, **PLUS_RULE)
    with pytest.raises(ValueError, match="n=0"):
        blocks_to_remove(scores, 0)


def test_criterion_options_pass_n_only_where_it_matters():
    assert criterion_options("sleb", 6) == {"n": 6}
    assert criterion_options("angular", 6) == {"n": 6}
    assert criterion_options("taylor+", 6) == {}


def test_bad_input_errors(tiny_llama, random_ids):
    with pytest.raises(ValueError, match=r"Unknown criterion 'tayler'.*Did you mean 'taylor'.*Available: angular, bi"):
        block_importance(tiny_llama, random_ids, "tayler")
    with pytest.raises(ValueError, match="non-empty"):
        block_importance(tiny_llama, torch.zeros(0, 8, dtype=torch.long), "ppl")
    with pytest.raises(ValueError, match="need >= 2"):
        block_importance(tiny_llama, random_ids[:, :1], "taylor")
    with pytest.raises(ValueError, match="non-empty"):
        block_importance(tiny_llama, None, "bi")


def test_cli_score_and_prune_with_sleb_and_plus(tmp_path, monkeypatch):
    """The CLI chains the same calls: sleb gets n from the ratio; a too-large n fails before scoring."""
    from shortened_llm import cli, importance, pipeline

    model = make_tiny_llama(num_layers=10)
    monkeypatch.setattr("shortened_llm.models.load_model", lambda *a, **k: (model, None))
    monkeypatch.setattr(cli, "_calibration", lambda args, tok, m: torch.randint(3, 128, (2, 12)))
    seen = {}
    real = importance.block_importance

    def spy(m, ids, criterion, **options):
        seen[criterion] = options
        return real(m, ids, criterion, progress=False, **options)

    monkeypatch.setattr(pipeline, "block_importance", spy)  # where the one pipeline scores
    monkeypatch.setattr("shortened_llm.models.save_model", lambda m, t, out, overwrite=False: out)
    assert cli.main(["prune", "--criterion", "sleb", "--ratio", "0.2", "--out", str(tmp_path / "p")]) == 0
    assert seen["sleb"] == {"n": 2, "unit": "block"}
    assert cli.main(["prune", "--criterion", "taylor+", "--ratio", "0.6", "--out", str(tmp_path / "q")]) == 2
    assert "taylor+" not in seen  # refused before any scoring


def test_explorer_widget_answers_a_seen_choice_without_redrawing(tmp_path, random_ids, monkeypatch, capsys):
    """Each (criterion, n) is drawn once: going back to it shows the kept PNG and the same text."""
    import IPython.display

    import shortened_llm.lessons.plots as plots
    from shortened_llm.lessons.explore import PruneExplorer, explorer_widget

    model = make_tiny_llama(num_layers=6)
    scores = {"ppl": block_importance(model, random_ids, "ppl", progress=False)}
    drawn, shown = [], []
    real = plots.plot_block_scores
    monkeypatch.setattr(plots, "plot_block_scores", lambda *a, **k: drawn.append(a[1]) or real(*a, **k))
    # outside a kernel the Output widget captures nothing: watch what it is given instead
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj.data))
    box = explorer_widget(PruneExplorer(model, scores, random_ids, run_dir=tmp_path), n=1)
    slider = box.children[0].children[1]
    slider.value = 2
    slider.value = 1
    texts = [t for t in capsys.readouterr().out.splitlines() if "removed blocks" in t]  # not clear_output's codes
    assert len(texts) == 3 and texts[0] == texts[2] != texts[1], texts
    assert "PPL" in texts[0]
    assert len(shown) == 3 and shown[0] == shown[2] != shown[1] and shown[0][:4] == b"\x89PNG"
    assert len(drawn) == 2, f"redrew a view already seen: {drawn}"


def test_explorer_widgets_stamp_their_figures_with_the_run(tmp_path, random_ids, monkeypatch):
    """A view of the explorer travels as a PNG like a saved figure: it names its preset and model."""
    import IPython.display
    import matplotlib.pyplot as plt

    import shortened_llm.lessons.plots as plots
    from shortened_llm.lessons.explore import PruneExplorer, explorer_widget, scores_widget

    model = make_tiny_llama(num_layers=6)
    scores = {"ppl": block_importance(model, random_ids, "ppl", progress=False)}
    stamped = []
    real = plots.stamp
    monkeypatch.setattr(plots, "stamp", lambda fig, preset, name: stamped.append((preset, name)) or real(fig, preset, name))
    monkeypatch.setattr(IPython.display, "display", lambda obj: None)
    monkeypatch.setattr(plt, "show", lambda: None)
    explorer_widget(PruneExplorer(model, scores, random_ids, run_dir=tmp_path), n=1, preset="smoke", model="m")
    scores_widget(scores, 2, preset="smoke", model="m")
    assert stamped == [("smoke", "m"), ("smoke", "m")]
    explorer_widget(PruneExplorer(model, scores, random_ids, run_dir=tmp_path), n=2)  # no run named: no stamp
    assert len(stamped) == 2


def test_ppl_bars_draw_each_datasets_dense_line_in_its_colour():
    import pandas as pd

    from shortened_llm.lessons import plots

    table = pd.DataFrame({"model": ["dense", "dense", "pruned", "pruned"], "dataset": ["wikitext2", "ptb"] * 2,
                          "ppl": [60.5, 95.2, 133.8, 220.1]})
    ax = plots.plot_ppl_bars(table, log=False, dense={"wikitext2": 60.5, "ptb": 95.2}).axes[0]
    bars = dict(zip(*reversed(ax.get_legend_handles_labels())))
    lines = {line.get_label(): line for line in ax.lines if line.get_label().startswith("dense,")}
    assert sorted(lines) == ["dense, ptb (95.2)", "dense, wikitext2 (60.5)"]
    for dataset, value in (("wikitext2", 60.5), ("ptb", 95.2)):
        line = lines[f"dense, {dataset} ({value})"]
        assert line.get_ydata()[0] == value
        assert line.get_color() == bars[dataset].get_facecolor()


def test_explorer_caches_and_matches_a_really_pruned_model(tmp_path, random_ids):
    from shortened_llm.lessons.explore import PruneExplorer, max_removable, rank_correlation, scores_for

    model = make_tiny_llama(num_layers=8)
    scores = {c: scores_for(model, random_ids, c, tmp_path, progress=False) for c in ("ppl", "magnitude")}
    assert (tmp_path / "scores" / "ppl.csv").exists()
    assert torch.equal(scores_for(None, None, "ppl+", tmp_path), scores["ppl"])  # loaded, not recomputed
    ex = PruneExplorer(model, scores, random_ids, run_dir=tmp_path)
    got = ex.evaluate("ppl", 2)
    pruned = remove_blocks(copy.deepcopy(model), got["removed"])
    assert got["ppl"] == pytest.approx(math.exp(token_nll(pruned, random_ids).double().mean().item()), rel=1e-5)
    again = PruneExplorer(None, scores, random_ids, run_dir=tmp_path)  # no model: must come from the file
    again._load()
    assert again.ppl_without(got["removed"]) == got["ppl"]
    assert max_removable(8, "ppl") == 7 and max_removable(8, "taylor+") == 2
    with pytest.raises(ValueError, match="n=3 blocks to remove but only 2"):
        ex.evaluate("ppl+", 3)
    corr = rank_correlation(scores)
    assert corr.loc["ppl", "ppl"] == pytest.approx(1.0)


def test_to_remove_never_picks_a_removed_unit():
    inf = float("inf")
    scores = torch.tensor([inf, 0.5, inf, 0.1, 0.3])  # units 0 and 2 are gone
    assert to_remove(scores, 2) == [3, 4]
    assert to_remove(scores, 2, keep_last=1) == [1, 3]
    with pytest.raises(ValueError, match="only 3 are left and one must stay"):
        to_remove(scores, 3)
    with pytest.raises(ValueError, match="reaches already removed units"):
        to_remove(scores, 1, keep_first=2, keep_last=2)  # the one unprotected unit (2) is gone
    assert blocks_to_remove is to_remove


@pytest.mark.parametrize("unit", ["attn", "mlp"])
def test_a_criterion_scores_only_the_units_it_declares(unit, tiny_llama, random_ids):
    from shortened_llm.importance import CRITERION_UNITS, check_criterion, criteria_for

    assert criteria_for(unit) == ["bi", "ppl", "random", "reverse", "sleb"]
    assert set(criteria_for("block")) == set(CRITERION_UNITS)
    assert check_criterion("sleb+", unit) == "sleb"
    for criterion in ("taylor", "magnitude+", "angular"):
        with pytest.raises(ValueError, match=re.escape(f"criterion '{criterion}' does not score unit '{unit}'")):
            block_importance(tiny_llama, random_ids, criterion, unit=unit)


def test_data_free_criteria_give_removed_halves_infinity(tiny_llama):
    from shortened_llm.subblock import remove_sublayers

    remove_sublayers(tiny_llama, "attn", [1])
    reverse = block_importance(tiny_llama, None, "reverse", unit="attn")
    assert reverse.tolist() == [4.0, float("inf"), 2.0, 1.0]
    assert torch.isinf(block_importance(tiny_llama, None, "random", unit="attn")[1])
    assert block_importance(tiny_llama, None, "reverse").tolist() == [4.0, 3.0, 2.0, 1.0]  # blocks: all alive


def test_plus_rule_comes_from_the_preset():
    from shortened_llm.pipeline import plus_rule
    from shortened_llm.presets import Preset, get_preset

    assert PLUS_RULE == {"keep_first": Preset().keep_first, "keep_last": Preset().keep_last} == plus_rule("ppl+")
    assert plus_rule("taylor+", get_preset("tiny", keep_first=1, keep_last=3)) == {"keep_first": 1, "keep_last": 3}
    assert plus_rule("taylor", "paper") == {"keep_first": 0, "keep_last": 0}
