"""Training reuse (``train_cache``): a run with the same recipe on the same weights is copied, never
trained twice; anything that changes what the run computes is trained again.

Real runs of ``partial`` (the cheapest training method) on a tiny random Llama at the ``tiny``
preset, about a second each; the method's function is wrapped to count how often it trains.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import make_tiny_llama
from shortened_llm import eval_cache, load_model, save_model
from shortened_llm.recovery import RECOVERY_METHODS, get_recovery
from shortened_llm.train_cache import tree_digest


@pytest.fixture
def trains(monkeypatch):
    """The list of ``out_dir``s ``partial`` actually trained into."""
    calls = []
    method = get_recovery("partial")

    def counted(*args, out_dir=None, **kwargs):
        calls.append(out_dir)
        return method.run(*args, out_dir=out_dir, **kwargs)

    monkeypatch.setitem(RECOVERY_METHODS, "partial", dataclasses.replace(method, run=counted))
    return calls


@pytest.fixture
def base(tmp_path, embedded):
    """The same tiny random model saved in two dirs: two paths, one set of weights."""
    model = make_tiny_llama(num_layers=4, vocab_size=len(embedded[1]))
    return save_model(model, embedded[1], tmp_path / "a"), save_model(model, embedded[1], tmp_path / "b")


def partial(model_dir, out_dir, **options):
    return get_recovery("partial")(str(model_dir), out_dir=out_dir, preset="tiny", progress=False, **options)


def test_the_same_recipe_on_the_same_weights_is_copied_not_trained(tmp_path, base, trains, capsys):
    with eval_cache.use(tmp_path / "run"):
        first = partial(base[0], tmp_path / "one")
        second = partial(base[1], tmp_path / "two", max_steps=2)  # tiny's cpt_steps, spelled out
    assert trains == [tmp_path / "one"]
    assert second.reused_from == str((tmp_path / "one").resolve())
    assert "not trained again" in capsys.readouterr().out
    assert eval_cache.weights_digest(second.model) == eval_cache.weights_digest(first.model)
    assert (second.steps, second.seconds, second.memory) == (first.steps, first.seconds, first.memory)
    assert tree_digest(tmp_path / "two") == tree_digest(tmp_path / "one")  # training.json and the loss log too


@pytest.mark.parametrize("change", ["seed", "preset field", "weights", "method option", "callback"])
def test_what_changes_the_run_trains_again(tmp_path, base, trains, change, embedded):
    options = {"seed": {"seed": 7}, "preset field": {"cpt_lr": 1e-3}, "method option": {"last_k": 1},
               "callback": {"callbacks": [__import__("transformers").TrainerCallback()]}}.get(change, {})
    other = base[1]
    if change == "weights":
        model, tok = load_model(base[1])
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
        other = save_model(model, tok, tmp_path / "changed")
    with eval_cache.use(tmp_path / "run"):
        partial(base[0], tmp_path / "one")
        second = partial(other, tmp_path / "two", **options)
    assert trains == [tmp_path / "one", tmp_path / "two"]
    assert second.reused_from is None


def test_an_earlier_run_edited_since_is_trained_again(tmp_path, base, trains):
    with eval_cache.use(tmp_path / "run"):
        partial(base[0], tmp_path / "one")
        (tmp_path / "one" / "loss_log.csv").write_text("step,loss\n")  # no longer what the entry saw
        second = partial(base[1], tmp_path / "two")
        third = partial(base[1], tmp_path / "three")  # the entry now names the new run
    assert trains == [tmp_path / "one", tmp_path / "two"]
    assert second.reused_from is None and third.reused_from == str((tmp_path / "two").resolve())


def test_an_existing_output_is_refused_as_the_method_refuses_it(tmp_path, base, trains):
    with eval_cache.use(tmp_path / "run"):
        partial(base[0], tmp_path / "one")
        save_model(*load_model(base[1]), tmp_path / "two")
        with pytest.raises(FileExistsError, match="overwrite"):
            partial(base[1], tmp_path / "two")
        assert partial(base[1], tmp_path / "two", overwrite=True).reused_from is not None
    assert trains == [tmp_path / "one"]


def test_without_a_store_every_call_trains_and_nothing_is_written(tmp_path, base, trains, monkeypatch):
    monkeypatch.delenv(eval_cache.ENV_VAR, raising=False)
    partial(base[0], tmp_path / "one")
    partial(base[1], tmp_path / "two")
    assert trains == [tmp_path / "one", tmp_path / "two"]
    assert not (tmp_path / "run").exists()


def test_the_same_blocks_scored_apart_share_the_run_and_keep_their_own_scores(tmp_path, embedded, trains):
    """Notebooks 03 and 09 remove the same blocks from the same weights but score them in separate
    processes: one run, and each copy's pruning.json says its own base's scores."""
    from shortened_llm.prune import remove_blocks

    dirs = []
    for name, scores in (("a", [4.0, 1.0, 3.0, 2.0]), ("b", [4.0, 1.0000001, 3.0, 2.0])):
        model = remove_blocks(make_tiny_llama(num_layers=4, vocab_size=len(embedded[1])), [1], criterion="ppl",
                              ratio=0.25, scores=scores)
        dirs.append(save_model(model, embedded[1], tmp_path / name))
    with eval_cache.use(tmp_path / "run"):
        partial(dirs[0], tmp_path / "one")
        second = partial(dirs[1], tmp_path / "two")
    assert trains == [tmp_path / "one"] and second.reused_from is not None
    record = json.loads((tmp_path / "two" / "pruning.json").read_text())
    assert record["scores"] == [4.0, 1.0000001, 3.0, 2.0] and record["removed_blocks"] == [1]
    assert second.model.pruning.scores == record["scores"]
