"""The evaluation cache: the same model under the same protocol is read back without calling the
model; a changed weight, dtype, block list or protocol misses; notebooks 06 and 09 share rows."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from shortened_llm import eval_cache, evaluate, zeroshot
from shortened_llm.data import data_dir
from shortened_llm.errors import CorruptFileError
from shortened_llm.eval_cache import EvalCache, run_dir_cache, weights_digest

needs_pack = pytest.mark.skipif(data_dir() is None or not (data_dir() / "zeroshot").is_dir(),
                                reason="needs the offline pack (SHORTENED_LLM_DATA)")


def _count_calls(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that still calls it; the list grows by one per call."""
    calls = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.fixture
def counted(monkeypatch):
    """Count the forward passes PPL makes (``evaluate.token_nll``, the compute behind every PPL)."""
    return _count_calls(monkeypatch, evaluate, "token_nll")


@pytest.fixture(scope="module")
def loaded_tiny(tiny_llama_dir):
    from shortened_llm import load_model

    return load_model(tiny_llama_dir, device="cpu")


@pytest.fixture
def tiny_pair(loaded_tiny):
    """A fresh copy of the tiny model (tests change its weights) with one tokenizer for the module:
    ``evaluate``'s token stream is cached per tokenizer object, so WikiText-2 is tokenized once."""
    import copy

    model, tok = loaded_tiny
    return copy.deepcopy(model), tok


def _ppl(model, tok, cache, **kw):
    return evaluate.perplexity(model, tok, "wikitext2", seq_len=32, max_segments=kw.pop("max_segments", 3),
                               batch_size=2, progress=False, cache=cache, **kw)


def test_same_model_and_protocol_is_read_back_without_calling_the_model(tiny_pair, tmp_path, monkeypatch):
    model, tok = tiny_pair
    cache = EvalCache(tmp_path)
    first = _ppl(model, tok, cache)
    assert len(list(tmp_path.glob("ppl-*.json"))) == 1

    def not_called(*args, **kwargs):
        raise AssertionError("a cached PPL called the model")

    monkeypatch.setattr(evaluate, "token_nll", not_called)
    assert _ppl(model, tok, cache) == first


def test_one_changed_weight_misses(tiny_pair, tmp_path, counted):
    model, tok = tiny_pair
    cache = EvalCache(tmp_path)
    _ppl(model, tok, cache)
    with torch.no_grad():
        next(model.parameters()).data.view(-1)[0] += 1e-3  # through .data: no version counter sees it
    _ppl(model, tok, cache)
    assert len(counted) == 2 and len(list(tmp_path.glob("ppl-*.json"))) == 2


def test_changed_segments_seq_len_bos_or_batch_size_miss(tiny_pair, tmp_path, counted):
    model, tok = tiny_pair
    cache = EvalCache(tmp_path)
    _ppl(model, tok, cache)
    _ppl(model, tok, cache, max_segments=4)
    evaluate.perplexity(model, tok, "wikitext2", seq_len=16, max_segments=3, batch_size=2, progress=False, cache=cache)
    _ppl(model, tok, cache, bos="per-segment")
    evaluate.perplexity(model, tok, "wikitext2", seq_len=32, max_segments=3, batch_size=3, progress=False, cache=cache)
    assert len(counted) == 5


def test_dtype_and_skipped_blocks_miss(tiny_pair, tmp_path, counted):
    from shortened_llm.prune import skipping_blocks

    model, tok = tiny_pair
    cache = EvalCache(tmp_path)
    _ppl(model, tok, cache)
    with skipping_blocks(model, [2]):
        _ppl(model, tok, cache)
    _ppl(model, tok, cache)  # restored: the first entry again
    _ppl(model.to(torch.bfloat16), tok, cache)
    assert len(counted) == 3
    keys = [json.loads(p.read_text())["key"] for p in tmp_path.glob("ppl-*.json")]
    assert sorted(k["dtype"] for k in keys) == ["bfloat16", "float32", "float32"]


def test_a_saved_and_reloaded_model_shares_its_rows(tiny_pair, tmp_path, counted):
    """Notebook 09's pruned copy and notebook 03's are different dirs of equal weights: one row."""
    from shortened_llm import load_model, save_model

    model, tok = tiny_pair
    cache = EvalCache(tmp_path / "cache")
    first = _ppl(model, tok, cache)
    again, tok2 = load_model(save_model(model, tok, tmp_path / "elsewhere"), device="cpu")
    assert weights_digest(again) == weights_digest(model)
    assert _ppl(again, tok2, cache) == first and len(counted) == 1


def test_off_unless_asked_and_use_turns_it_on(tiny_pair, tmp_path, monkeypatch, counted):
    monkeypatch.delenv(eval_cache.ENV_VAR, raising=False)
    model, tok = tiny_pair
    _ppl(model, tok, None)
    _ppl(model, tok, None)
    assert len(counted) == 2  # no cache: today's behaviour
    with eval_cache.use(tmp_path / "run"):
        _ppl(model, tok, None)
        _ppl(model, tok, None)
        assert eval_cache.active().root == tmp_path / "run" / "eval_cache"
    assert len(counted) == 3 and eval_cache.active() is None
    monkeypatch.setenv(eval_cache.ENV_VAR, str(tmp_path / "env"))
    _ppl(model, tok, None)
    _ppl(model, tok, False)  # False: never cached
    assert len(counted) == 5 and len(list((tmp_path / "env").glob("ppl-*.json"))) == 1


def test_two_writers_of_one_key_compute_it_once(tmp_path):
    cache = run_dir_cache(tmp_path)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return 1.5

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute({"kind": "x", "a": 1}, slow)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [1.5, 1.5] and len(calls) == 1
    assert [p.name for p in (tmp_path / "eval_cache").iterdir()] == [cache.path({"kind": "x", "a": 1}).name]


def test_a_corrupt_entry_is_refused_with_its_path(tmp_path):
    cache = EvalCache(tmp_path)
    cache.path({"kind": "x"}).write_text("{not json")
    with pytest.raises(CorruptFileError, match="evaluation-cache entry"):
        cache.get({"kind": "x"})


def test_the_work_of_a_run_is_summed_per_kind_from_its_own_entries(tmp_path):
    """A measurement counts its own seconds, a training run the training's (in its value); an entry
    written before ``since`` (an earlier run) and a file that is no entry count nothing."""
    cache = EvalCache(tmp_path)
    cache.put({"kind": "ppl", "model": 1}, 60.5, seconds=12.0)
    cache.put({"kind": "ppl", "model": 2}, 70.1, seconds=3.0)
    cache.put({"kind": "training", "model": 1}, {"out_dir": "x", "seconds": 100.0})  # as train_cache stores it
    earlier = cache.put({"kind": "zero_shot", "model": 1}, {"value": 0.5}, seconds=50.0)
    entry = json.loads(earlier.read_text())
    earlier.write_text(json.dumps({**entry, "written": "2020-01-01 00:00:00"}))
    (tmp_path / "notes.json").write_text("{not an entry")
    assert cache.seconds_by_kind() == {"ppl": 15.0, "training": 100.0, "zero_shot": 50.0}
    assert cache.seconds_by_kind(since=time.time() - 60) == {"ppl": 15.0, "training": 100.0}


@needs_pack
def test_zero_shot_rows_are_cached_per_task_and_limit(tiny_pair, tmp_path, monkeypatch):
    model, tok = tiny_pair
    cache = EvalCache(tmp_path)
    first = zeroshot.zero_shot(model, tok, tasks=["winogrande"], limit=2, batch_size=2, progress=False, cache=cache)
    calls = []
    real = zeroshot._task_row
    monkeypatch.setattr(zeroshot, "_task_row", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    again = zeroshot.zero_shot(model, tok, tasks=["winogrande"], limit=2, batch_size=2, progress=False, cache=cache)
    assert calls == [] and again.equals(first)
    zeroshot.zero_shot(model, tok, tasks=["winogrande"], limit=3, batch_size=2, progress=False, cache=cache)
    assert calls == ["winogrande"]


@needs_pack
def test_notebook_09s_quick_eval_reads_notebook_06s_rows(tiny_pair, tmp_path, monkeypatch):
    """06 measures through ``ppl_table`` and ``zero_shot_table``, 09 through ``quick_eval`` at the same
    budgets (``grid.measured``): with the run dir's cache on, 09 calls the model for nothing."""
    from shortened_llm.lessons.claims import ppl_table
    from shortened_llm.lessons.grids import recovery_grid
    from shortened_llm.lessons.recovery_table import quick_eval
    from shortened_llm.presets import get_preset

    model, tok = tiny_pair
    cfg = get_preset("tiny")
    with eval_cache.use(tmp_path):
        ppl = ppl_table({"dense": (model, tok)}, tmp_path / "eval" / "ppl.csv", seq_len=cfg.eval_seq_len,
                        max_segments=cfg.eval_segments, batch_size=cfg.eval_batch_size, datasets=("wikitext2",))
        zs = zeroshot.zero_shot_table({"dense": lambda: (model, tok)}, tmp_path / "eval" / "zeroshot.csv",
                                      tasks=cfg.zero_shot_tasks, limit=cfg.zero_shot_limit,
                                      batch_size=cfg.eval_batch_size, progress=False)

        def not_called(*args, **kwargs):
            raise AssertionError("notebook 09 scored a model notebook 06 had scored")

        monkeypatch.setattr(evaluate, "token_nll", not_called)
        monkeypatch.setattr(zeroshot, "_task_row", not_called)
        row = quick_eval(model, tok, recovery_grid(cfg).measured(cfg))
    once = ppl[ppl.bos == "once"].ppl.iloc[0]
    assert row["wikitext2_ppl"] == once and row["zero_shot_avg"] == pytest.approx(zs.value.mean())


@needs_pack
def test_a_grid_without_zero_shot_measures_ppl_alone_and_a_later_call_fills_the_average_in(
        tiny_llama_dir, tmp_path, monkeypatch):
    """smoke's grid leaves the zero-shot average out of 09's rows (``RecoveryGrid.zero_shot``): the
    harness is never called and the row keeps its PPL; a later call that wants the average measures
    it into the same row, and one that does not reads that row back as it is."""
    import math

    from shortened_llm.lessons.grids import GRIDS
    from shortened_llm.lessons.recovery_table import recover

    assert not GRIDS["smoke"].zero_shot and GRIDS["cpu"].zero_shot and GRIDS["paper"].zero_shot
    tasks = _count_calls(monkeypatch, zeroshot, "_task_row")  # one per task lm-eval runs
    out = tmp_path / "dense"
    bare = recover(tiny_llama_dir, "none", out, preset="tiny", zero_shot=False)
    assert tasks == [] and math.isnan(bare["zero_shot_avg"]) and bare["wikitext2_ppl"] > 1
    full = recover(tiny_llama_dir, "none", out, preset="tiny")
    assert tasks and 0 <= full["zero_shot_avg"] <= 1 and full["wikitext2_ppl"] == bare["wikitext2_ppl"]
    measured = len(tasks)
    again = recover(tiny_llama_dir, "none", out, preset="tiny", zero_shot=False)
    assert len(tasks) == measured and json.dumps(again) == json.dumps(full)  # as JSON: NaN memory columns compare equal
    assert json.dumps(json.loads((out / "row.json").read_text())) == json.dumps(full)

def test_block_scores_are_read_back_and_any_change_of_model_ids_or_options_misses(tiny_pair, tmp_path, monkeypatch):
    """Notebooks 09 and 10 score the same dense model on the same calibration ids: once. The scores
    read back are the computed ones to the bit, on any number of cores (notebook 01 scores on two and
    the notebooks beside each other prune on one); data-free criteria are never stored."""
    import functools

    from shortened_llm import importance
    from shortened_llm.pipeline import prune_model

    model, tok = tiny_pair
    calls = []

    def counting(name):
        real = importance.CRITERIA[name]

        @functools.wraps(real)  # block_importance reads the criterion's signature
        def criterion(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        monkeypatch.setitem(importance.CRITERIA, name, criterion)

    for name in ("ppl", "sleb", "reverse"):
        counting(name)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    uncached = importance.block_importance(model, ids, "ppl", cache=False, progress=False)
    cache = run_dir_cache(tmp_path)  # what eval_cache.use(tmp_path) turns on
    first = importance.block_importance(model, ids, "ppl", cache=cache, progress=False)
    again = importance.block_importance(model, ids, "ppl", cache=cache)  # progress shown or not: one entry
    assert calls == ["ppl", "ppl"] and torch.equal(first, uncached) and torch.equal(again, uncached)
    assert again.dtype == torch.float64 and len(list(cache.root.glob("scores-*.json"))) == 1
    with eval_cache.use(tmp_path):  # the active cache, as in a notebook: prune_model removes the same blocks
        _, removed, scores = prune_model(model, ids, "ppl", 1)
    assert calls == ["ppl", "ppl"] and torch.equal(scores, uncached)
    assert removed == [int(uncached.argmin())]
    importance.block_importance(model, ids[:1], "ppl", cache=cache)  # other ids
    importance.block_importance(model, ids, "ppl", unit="attn", cache=cache)  # another unit
    importance.block_importance(model, ids, "sleb", cache=cache, n=1)
    importance.block_importance(model, ids, "sleb", cache=cache, n=2)  # another option
    with torch.no_grad():
        next(model.parameters()).data.view(-1)[0] += 1e-3
    importance.block_importance(model, ids, "ppl", cache=cache)  # another weight
    importance.block_importance(model, ids, "reverse", cache=cache)
    importance.block_importance(model, ids, "reverse", cache=cache)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)  # another core count: 01's scores, read back
    importance.block_importance(model, ids, "ppl", cache=cache)
    assert calls == ["ppl", "ppl", "ppl", "ppl", "sleb", "sleb", "ppl", "reverse", "reverse"]
    assert len(list(cache.root.glob("scores-*.json"))) == 6  # the data-free one costs less than its key
