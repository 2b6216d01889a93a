"""measure_generation and sweeps: forced lengths, tidy tables, OOM rows, bad input (no timing asserts)."""
from __future__ import annotations

import copy
import gc
import math
import time

import pandas as pd
import pytest
import torch

from conftest import make_tiny_llama
from shortened_llm import efficiency
from shortened_llm.efficiency import is_oom, measure_generation, memory_table, speedup_table, sweep_generation, weights_mb
from shortened_llm.models import count_params
from shortened_llm.prune import remove_blocks
from shortened_llm.width import width_prune


pytestmark = pytest.mark.usefixtures("one_thread")


def test_measure_generation_row(tiny_llama):
    row = measure_generation(tiny_llama, batch_size=2, prompt_len=5, new_tokens=4, warmup=1, repeats=2)
    assert row["status"] == "ok" and row["device"] == "cpu"
    assert row["latency_min_s"] <= row["latency_s"]
    assert row["tokens_per_s"] == pytest.approx(2 * 4 / row["latency_s"])
    assert row["prefill_s"] > 0 and row["params"] == count_params(tiny_llama)
    assert row["peak_mem_mb"] >= row["weights_mb"] == pytest.approx(weights_mb(tiny_llama))
    assert row["mem_source"] == "rss_growth_sampled" and math.isnan(row["gpu_util_mean"])


def test_forced_length_ignores_eos():
    """A model that always predicts EOS must still produce exactly new_tokens tokens."""
    model = make_tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[model.config.eos_token_id] = 1.0  # EOS wins every argmax ...
        model.model.norm.weight.fill_(1.0)
    ids = torch.randint(3, 128, (1, 4))
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert plain.shape[1] < 4 + 6  # ... so an unforced generate stops early
    efficiency._generate_fn(model, ids, 6)()  # raises if the length were not forced


@pytest.mark.parametrize("kwargs, name", [
    ({"batch_size": 0}, "batch_size"), ({"new_tokens": -1}, "new_tokens"),
    ({"prompt_len": 0}, "prompt_len"), ({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"),
    ({"batch_size": 1.5}, "batch_size"),
])
def test_bad_input(tiny_llama, kwargs, name):
    with pytest.raises(ValueError, match=name):
        measure_generation(tiny_llama, **{"new_tokens": 2, "prompt_len": 3, **kwargs})


def test_sweep_is_tidy_and_interleaved(tiny_llama):
    depth = remove_blocks(copy.deepcopy(tiny_llama), [1, 2])
    width = width_prune(copy.deepcopy(tiny_llama), target_params=count_params(depth))
    df = sweep_generation({"dense": tiny_llama, "depth": depth, "width": width}, batch_sizes=(2, 1), new_tokens=(3,),
                          prompt_len=4, warmup=0, repeats=1, rounds=1, progress=False)
    assert len(df) == 3 * 2
    assert list(df.model[:3]) == ["dense", "depth", "width"]  # interleaved, smallest batch first
    assert set(df.status) == {"ok"}
    sp = speedup_table(df)
    assert (sp[sp.model == "dense"].speedup_median == 1).all()
    mem = memory_table(df)
    assert len(mem) == 3 * 2 and (mem.weights_mb > 0).all()
    with pytest.raises(ValueError, match="baseline='sparse'"):
        speedup_table(df, baseline="sparse")
    with pytest.raises(ValueError, match="batch_size=0"):
        sweep_generation({"dense": tiny_llama}, batch_sizes=(1, 0))


def test_oom_is_recorded_and_sweep_goes_on(tiny_llama, monkeypatch):
    real = efficiency.measure_generation

    def fake_oom_at_4(model, batch_size, *args, **kw):  # simulate the allocator failing at batch 4
        if batch_size >= 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch_size, *args, **kw)

    monkeypatch.setattr(efficiency, "measure_generation", fake_oom_at_4)
    df = sweep_generation({"dense": tiny_llama}, batch_sizes=(1, 4, 8), new_tokens=(2,), prompt_len=3,
                          warmup=0, repeats=1, progress=False)
    assert list(df.status) == ["ok", "oom", "oom (skipped)"]
    assert "oom" in set(memory_table(df).status)


def test_sweep_keeps_finished_rows_when_cut_short(tiny_llama, monkeypatch, tmp_path):
    """csv_path holds every run finished before an interruption; tags make sweeps concatenable."""
    real, calls = efficiency.measure_generation, []

    def interrupted_at_third_run(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like a time limit or Ctrl-C in the middle of a sweep
        return real(*args, **kw)

    monkeypatch.setattr(efficiency, "measure_generation", interrupted_at_third_run)
    out = tmp_path / "sweep.csv"
    with pytest.raises(KeyboardInterrupt):
        sweep_generation({"dense": tiny_llama}, batch_sizes=(1, 2, 3), new_tokens=(2,), prompt_len=3, warmup=0,
                         repeats=1, progress=False, csv_path=out, tags={"shape": "tiny"})
    kept = pd.read_csv(out)
    assert list(kept.batch_size) == [1, 2] and list(kept.columns[:2]) == ["shape", "model"]

    monkeypatch.setattr(efficiency, "measure_generation", real)
    small = sweep_generation({"dense": tiny_llama, "depth": remove_blocks(copy.deepcopy(tiny_llama), [1])},
                             new_tokens=(2,), prompt_len=3, warmup=0, repeats=1, progress=False, tags={"shape": "a"})
    both = pd.concat([small, small.assign(shape="b", latency_s=small.latency_s * 2)])
    sp = speedup_table(both)  # each shape against its own dense model
    assert len(sp) == 4  # a merge on batch and length alone would pair each shape with both dense rows
    assert sp[sp["shape"] == "a"].speedup_median.tolist() == pytest.approx(sp[sp["shape"] == "b"].speedup_median.tolist())
    assert len(memory_table(both)) == 4


def test_non_memory_errors_propagate(tiny_llama, monkeypatch):
    monkeypatch.setattr(efficiency, "measure_generation", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        sweep_generation({"dense": tiny_llama}, progress=False)


def test_is_oom():
    assert is_oom(MemoryError()) and is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not is_oom(RuntimeError("size mismatch")) and not is_oom(ValueError("out of memory"))


BIG = 256 * 2**20  # an allocation the tests below must see, twice what the process may lose meanwhile


def test_rss_sampler_sees_a_big_allocation():
    # The garbage collector may free an earlier test's model while this one allocates, and the
    # resident size then falls by as much as it rises: collect first, and hold it off. Even so, CI
    # saw the resident size fall by 80 MiB during a 64 MiB allocation (the kernel taking back clean
    # file-backed pages, such as a model's mmapped weights, can do that): hence 256 MiB, a 128 MiB bar.
    gc.collect()
    gc.disable()
    try:
        _sample_a_big_allocation()
    finally:
        gc.enable()


def _fresh_pages(n_bytes: int):
    """``n_bytes`` of new anonymous pages, each touched: a tensor of the same size may reuse pages that the
    heap kept resident from an earlier test's freed model (the resident size would not rise at all)."""
    import mmap

    pages = mmap.mmap(-1, n_bytes)
    for i in range(0, n_bytes, mmap.PAGESIZE):
        pages[i] = 1
    return pages


def _sample_a_big_allocation():
    with efficiency.Sampler(efficiency.rss_bytes, period=0.001) as s:
        base = efficiency.rss_bytes()
        x = _fresh_pages(BIG)
        deadline = time.monotonic() + 5  # a loaded machine may starve the sampler thread for a while
        while time.monotonic() < deadline and (not s.values or max(s.values) - base <= BIG / 2):
            s._stop.wait(0.01)
        x.close()
    assert max(s.values) - base > BIG / 2


def test_track_peak_memory_sees_an_allocation_inside_the_block():
    """What a retraining's ``training.json`` reports as ``memory_*``: the peak inside the block."""
    from shortened_llm import distill

    assert distill.track_peak_memory is efficiency.track_peak_memory  # re-exported, not a copy
    gc.collect()
    gc.disable()  # as in the sampler test: a collection freeing an earlier test's model would hide the rise
    try:
        with efficiency.track_peak_memory("cpu") as memory:
            x = _fresh_pages(BIG)  # alive at the block's last sample, taken on exit
        x.close()
    finally:
        gc.enable()
    assert memory["source"] == "rss" and memory["growth_mb"] > BIG / 2 / 2**20
    assert memory["peak_mb"] == pytest.approx(memory["before_mb"] + memory["growth_mb"])
