"""Generation latency, throughput, memory and GPU utilisation (paper, Section 4.3 and Figure 1).

The official scripts force the output length (``min_new_tokens = max_new_tokens``, so EOS
never ends a sequence early) and time whole ``generate`` calls after a warm-up; we do the
same. ``generation_protocol(preset)`` gives the rest of a preset's protocol: in ``paper`` the
official one (a fixed prompt, top-k / top-p sampling, fp16, 10 warm-up runs and the mean of
20), in the CPU presets a cheaper one (random ids, greedy, 1 warm-up, the median of 3).

Two numbers matter and pull in different directions:

- **latency** (seconds per batch): at batch 1 decoding is a chain of small, sequential
  steps, one per block per token, so removing blocks (depth) shortens the chain while
  thinner blocks (width) barely do;
- **throughput** (tokens/s = batch x new tokens / latency): at large batches the matrix
  products dominate, and any parameter reduction helps.

Timing uses CUDA events on GPU (the GPU runs asynchronously; a host clock would time the
launches) and ``time.perf_counter`` on CPU. Memory is weights plus the peak growth over
the level just before the first call: on GPU from ``torch.cuda.max_memory_allocated``, less
what was allocated before (the other models of a side-by-side sweep, for instance). On CPU
there is no allocator counter, so we sample the process's resident set size (RSS) in a
thread and report its peak growth over the level measured just before the first (warm-up)
call; ``ru_maxrss`` is used too, but only when it rose during the call, since it is a
process-lifetime high-water mark that never decreases. GPU utilisation is sampled with
nvidia-ml-py (``pynvml``) in a thread on NVIDIA GPUs.

The same samplers measure any block of code: ``track_peak_memory`` is what a retraining reports
as its ``memory_*`` (KD holds a teacher beside the student; partial fine-tuning fewer optimizer states).
"""
from __future__ import annotations

import contextlib
import gc
import os
import resource
import statistics
import sys
import threading
import time
from typing import Callable, Iterable, Mapping

import pandas as pd
import torch
from tqdm.auto import tqdm

from .artifacts import atomic_write_text
from .dtypes import parse_dtype
from .models import count_params

__all__ = [
    "measure_generation",
    "generation_protocol",
    "sweep_generation",
    "speedup_table",
    "memory_table",
    "weights_mb",
    "is_oom",
    "track_peak_memory",
]

MB = 2**20
_STATISTICS = {"median": statistics.median, "mean": statistics.fmean}  # what latency_s summarises the timed runs by


# ---- samplers: a thread that calls ``read()`` every ``period`` seconds ----------------------

class Sampler:
    """Collect ``read()`` values in a daemon thread while the ``with`` block runs."""

    def __init__(self, read: Callable[[], float], period: float = 0.01):
        self.read, self.period, self.values = read, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.values.append(float(self.read()))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self.values.append(float(self.read()))


def rss_bytes() -> int:
    """Current resident set size of this process (psutil when installed, else /proc)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _nvml_reader(device: torch.device) -> tuple[Callable[[], float], Callable[[], None]] | None:
    """A function returning the GPU's utilisation in percent, or None without nvidia-ml-py / NVIDIA."""
    if device.type != "cuda" or torch.version.hip is not None:
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(device)
        uuid = getattr(props, "uuid", None)
        if uuid is not None:  # robust to CUDA_VISIBLE_DEVICES reordering
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception:  # noqa: BLE001 - a missing driver must not stop a measurement
        return None
    return (lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), pynvml.nvmlShutdown


@contextlib.contextmanager
def track_peak_memory(device=None):
    """Peak memory of the ``with`` block: yields a dict filled on exit with ``peak_mb`` and ``before_mb``.

    GPU: ``max_memory_allocated`` (everything allocated, weights included). CPU: the process's
    resident set size sampled in a thread (``Sampler``), so ``peak_mb`` includes the Python
    runtime and libraries; ``growth_mb`` is the rise over the level before the block. What a
    retraining costs in memory (KD holds a teacher too) is read the same way on both.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        peak = torch.cuda.max_memory_allocated(device)
        result.update(peak_mb=peak / MB, before_mb=before / MB, growth_mb=(peak - before) / MB, source="cuda")
        return
    before = rss_bytes()
    with Sampler(rss_bytes, period=0.02) as sampler:
        yield result
    peak = max(sampler.values + [before])
    result.update(peak_mb=peak / MB, before_mb=before / MB, growth_mb=(peak - before) / MB, source="rss")


def is_oom(err: BaseException) -> bool:
    """CUDA out-of-memory, or a CPU allocation failure (both mean: this setting does not fit)."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def weights_mb(model) -> float:
    """Bytes of parameters and buffers, in MiB (what the model alone occupies)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors) / MB


# ---- timing ---------------------------------------------------------------------------------

class _Timer:
    """CUDA events on GPU (asynchronous kernels), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def _generate_fn(model, ids: torch.Tensor, new_tokens: int, sampling: dict | None = None):
    """One forced-length ``generate`` call: min = max new tokens, so EOS cannot stop it.

    Greedy, or with ``sampling`` (``{"top_k": 50, "top_p": 0.95}``, the official timing) sampled.
    """
    from transformers import GenerationConfig

    gen = model.generation_config
    eos = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else model.config.eos_token_id
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sampling is not None,
                              eos_token_id=eos, pad_token_id=pad, use_cache=True, **(sampling or {}))
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        if out.shape[1] != ids.shape[1] + new_tokens:  # internal invariant of the forced length
            raise AssertionError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {new_tokens}")
        return out

    return run


def _prompt_ids(model, batch_size: int, prompt_len: int, seed: int, prompt: str | None, tokenizer) -> torch.Tensor:
    """``(batch_size, T)`` prompt ids: ``prompt`` tokenized and repeated (official timing), else random ids."""
    if prompt is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=g)
    if tokenizer is None:
        raise ValueError(f"prompt={prompt!r} needs the model's tokenizer: pass tokenizer=")
    return tokenizer([prompt] * batch_size, return_tensors="pt").input_ids


def measure_generation(model, batch_size: int = 1, prompt_len: int = 32, new_tokens: int = 128, warmup: int = 1,
                       repeats: int = 3, seed: int = 0, prefill: bool = True, *, prompt: str | None = None,
                       tokenizer=None, sampling: bool = False, top_k: int = 50, top_p: float = 0.95,
                       statistic: str = "median", util_period: float = 0.05, dtype: str | None = None) -> dict:
    """Time ``repeats`` forced-length ``generate`` calls after ``warmup`` untimed ones.

    Prompts are random token ids (timings do not depend on the text), or ``prompt`` tokenized
    by ``tokenizer`` and repeated ``batch_size`` times (the official protocol; ``prompt_len``
    is then its length). Decoding is greedy, or with ``sampling`` top-k / top-p (seeded by
    ``seed``). ``dtype`` (a name) refuses a model in another dtype, so a protocol that times
    fp16 models never times bf16 ones silently. ``generation_protocol(preset)`` gives all of
    these from a preset. Returns one row:
    ``latency_s`` (the ``statistic``, median or mean, of the seconds per batch) and ``latency_min_s``,
    ``tokens_per_s`` (batch x new tokens / latency), with ``prefill=True`` also ``prefill_s`` (a
    1-token generate: the prompt pass) and ``decode_tokens_per_s`` (tokens after the
    first, over the time after the prefill), ``weights_mb``, ``peak_mem_mb`` = weights +
    ``peak_growth_mb``, the peak growth over the level before the warm-up (GPU:
    ``max_memory_allocated``; CPU: RSS), so models sharing one device each report their own
    memory, ``max_allocated_mb`` (GPU: ``max_memory_allocated`` itself, the official VRAM number),
    ``gpu_util_mean``/``gpu_util_max`` (percent, sampled every ``util_period`` seconds, NVIDIA with
    nvidia-ml-py only; NaN otherwise), ``mem_source`` and ``device``.
    """
    _check_positive(batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats)
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} must be an integer >= 0")
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic={statistic!r} must be one of {', '.join(_STATISTICS)}")
    device = next(model.parameters()).device
    wanted = parse_dtype(dtype, "dtype") if dtype is not None else None  # "auto" asks for nothing either
    if wanted is not None and next(model.parameters()).dtype != wanted:
        raise ValueError(f"dtype={dtype!r}: the protocol times {dtype} models, this one is in "
                         f"{next(model.parameters()).dtype}: load it with dtype={dtype!r} (or pass dtype=None)")
    ids = _prompt_ids(model, batch_size, prompt_len, seed, prompt, tokenizer).to(device)
    prompt_len = ids.shape[1]
    options = {"top_k": top_k, "top_p": top_p} if sampling else None
    run, first = _generate_fn(model, ids, new_tokens, options), _generate_fn(model, ids, 1, options)
    if sampling:
        torch.manual_seed(seed)  # the sampled tokens, hence the work, are the same run to run
    timer = _Timer(device)
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda0 = torch.cuda.memory_allocated(device)  # other models on the same GPU are not this one's memory
    rss0, maxrss0 = rss_bytes(), maxrss_bytes()
    nvml = _nvml_reader(device)
    with Sampler(rss_bytes) as rss:
        for _ in range(warmup):
            run()
        with Sampler(nvml[0], period=util_period) if nvml else contextlib.nullcontext() as util:
            times = [timer(run) for _ in range(repeats)]
        prefill_times = [timer(first) for _ in range(repeats)] if prefill else []
    if nvml:
        nvml[1]()
    latency = _STATISTICS[statistic](times)
    w_mb = weights_mb(model)
    max_allocated_mb = float("nan")
    if device.type == "cuda":
        max_allocated_mb = torch.cuda.max_memory_allocated(device) / MB
        growth_mb = (torch.cuda.max_memory_allocated(device) - cuda0) / MB
        peak_mb, mem_source = w_mb + growth_mb, "cuda_max_allocated_growth"
    else:
        peak_rss = max(rss.values)
        maxrss1 = maxrss_bytes()
        if maxrss1 > maxrss0:  # the lifetime high-water mark rose during this call: it is this call's peak
            peak_rss = max(peak_rss, maxrss1)
        growth_mb = max(peak_rss - rss0, 0) / MB
        peak_mb, mem_source = w_mb + growth_mb, "rss_growth_sampled"
    row = {
        "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
        "latency_s": latency, "latency_min_s": min(times), "tokens_per_s": batch_size * new_tokens / latency,
        "params": count_params(model), "weights_mb": w_mb, "peak_mem_mb": peak_mb, "peak_growth_mb": growth_mb,
        "mem_source": mem_source, "max_allocated_mb": max_allocated_mb, "statistic": statistic,
        "decoding": "sampling" if sampling else "greedy",
        "gpu_util_mean": statistics.fmean(util.values) if nvml and util.values else float("nan"),
        "gpu_util_max": max(util.values) if nvml and util.values else float("nan"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "status": "ok",
    }
    if prefill:
        row["prefill_s"] = _STATISTICS[statistic](prefill_times)
        decode_s = latency - row["prefill_s"]
        row["decode_tokens_per_s"] = batch_size * (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else float("nan")
    return row


def sweep_generation(models: Mapping[str, object], batch_sizes: Iterable[int] = (1,), new_tokens: Iterable[int] = (128,),
                     prompt_len: int = 32, warmup: int = 1, repeats: int = 3, rounds: int = 1, seed: int = 0,
                     progress: bool = True, csv_path: str | os.PathLike | None = None,
                     tags: Mapping[str, object] | None = None, tokenizer=None, **protocol) -> pd.DataFrame:
    """A tidy table (one row per model x batch x output length x round) of ``measure_generation``.

    Models are measured interleaved for every setting (dense, depth, width, dense, ...), so a
    slow spell of a shared machine hits all of them alike; ``rounds`` repeats the
    interleaving over the whole sweep, the ``warmup`` calls in the first round only (later
    rounds find each model warm), so ``rounds=5, repeats=1`` times the same five calls a point
    as ``repeats=5`` spread over the sweep's length (``generation_protocol`` does that for a
    preset with ``timing_interleave``). A setting that runs out of memory is recorded with ``status="oom"`` and
    the sweep goes on. With ``csv_path`` the table so far is rewritten (atomically) after
    every run, so a sweep cut short by a time limit keeps the rows it finished. ``tags`` are
    constant columns put first in every row (such as ``{"shape": "llama-1-7b"}``), so the
    tables of several sweeps can be concatenated. ``tokenizer`` and ``protocol`` (``prompt``,
    ``sampling``, ``top_k``, ``top_p``, ``statistic``, ``util_period``, ``dtype``) go to
    ``measure_generation``: ``sweep_generation(models, tokenizer=tok, **generation_protocol(preset))``
    runs a preset's protocol (the official one in ``paper``).
    """
    unknown = set(protocol) - _PROTOCOL_OPTIONS
    if unknown:
        raise ValueError(f"unknown protocol option(s) {sorted(unknown)}: expected {', '.join(sorted(_PROTOCOL_OPTIONS))}")
    batch_sizes, new_tokens = sorted(batch_sizes), list(new_tokens)
    if not models:
        raise ValueError("models is empty: pass a mapping like {'dense': model, 'depth': pruned}")
    for b in batch_sizes:
        _check_positive(batch_size=b)
    for n in new_tokens:
        _check_positive(new_tokens=n)
    _check_positive(rounds=rounds)
    settings = [(r, n, b, name) for r in range(rounds) for n in new_tokens for b in batch_sizes for name in models]
    rows, oom_at = [], {}
    for r, n, b, name in tqdm(settings, desc="generation sweep", unit="run", disable=not progress):
        model = models[name]
        base = {**(tags or {}), "model": name, "round": r, "batch_size": b, "new_tokens": n, "prompt_len": prompt_len,
                "params": count_params(model), "weights_mb": weights_mb(model)}
        if b >= oom_at.get((name, n), float("inf")):  # a batch no larger already ran out of memory
            rows.append({**base, "status": "oom (skipped)"})
            continue
        try:
            row = measure_generation(model, b, prompt_len, n, warmup if r == 0 else 0, repeats, seed,
                                     tokenizer=tokenizer, **protocol)
        except Exception as err:  # noqa: BLE001 - only memory errors are recorded, others re-raised
            if not is_oom(err):
                raise
            _free(next(model.parameters()).device)
            oom_at[(name, n)] = min(b, oom_at.get((name, n), b))
            rows.append({**base, "status": "oom"})
        else:
            rows.append({**base, **row})
        if csv_path is not None:
            atomic_write_text(csv_path, pd.DataFrame(rows).to_csv(index=False))
    return pd.DataFrame(rows)


_PROTOCOL_OPTIONS = {"prompt", "sampling", "top_k", "top_p", "statistic", "util_period", "dtype"}


def generation_protocol(preset) -> dict:
    """``sweep_generation``'s settings from a preset: the official timing protocol in ``paper``
    (``script/measure_time.sh``: the Pisa prompt, batches 1-256, 128 and 512 forced tokens, top-k 50 /
    top-p 0.95 sampling, fp16, 10 warm-up and the mean of 20 runs, GPU sampled every 0.5 s), the
    cheap one in the CPU presets (random ids, greedy, 1 warm-up, the median of 5 calls, each call a round
    of its own: ``timing_interleave``)."""
    calls = {"repeats": 1, "rounds": preset.repeats} if preset.timing_interleave else {"repeats": preset.repeats}
    return {"batch_sizes": preset.batch_sizes, "new_tokens": preset.new_tokens, "prompt_len": preset.prompt_len,
            "warmup": preset.timing_warmup, **calls, "prompt": preset.timing_prompt,
            "sampling": preset.timing_sampling, "top_k": preset.timing_top_k, "top_p": preset.timing_top_p,
            "statistic": preset.timing_statistic, "util_period": preset.gpu_util_period, "dtype": preset.timing_dtype}


def _setting_keys(df: pd.DataFrame) -> list[str]:
    """Columns that identify one setting; ``shape`` too when several sweeps were concatenated."""
    return [c for c in ("shape",) if c in df] + ["batch_size", "new_tokens"]


def _summary(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[df.status == "ok"].copy()
    extra = {}
    if "prefill_s" in ok:  # decode time: the whole call minus its prompt pass
        ok["decode_s"] = ok.latency_s - ok.prefill_s
        extra = {"decode_s": ("decode_s", "median")}
    return (ok.groupby(["model", *_setting_keys(ok)], as_index=False)
              .agg(params=("params", "first"), latency_s=("latency_s", "median"),
                   latency_min_s=("latency_min_s", "min"), tokens_per_s=("tokens_per_s", "median"), **extra))


def speedup_table(df: pd.DataFrame, baseline: str = "dense") -> pd.DataFrame:
    """Per model and setting: latency speedup over ``baseline``.

    ``speedup_median`` compares medians over rounds, ``speedup_min`` the fastest runs
    (least disturbed by other load), ``decode_speedup_median`` the time after the prompt pass.
    """
    if baseline not in set(df.model):
        raise ValueError(f"baseline={baseline!r} is not a model in the table: {sorted(set(df.model))}")
    s = _summary(df)
    cols = [c for c in ("latency_s", "latency_min_s", "decode_s") if c in s]
    keys = _setting_keys(s)
    base = s[s.model == baseline][[*keys, *cols]]
    s = s.merge(base, on=keys, suffixes=("", "_base"))
    s["speedup_median"] = s.latency_s_base / s.latency_s
    s["speedup_min"] = s.latency_min_s_base / s.latency_min_s
    if "decode_s" in s:
        s["decode_speedup_median"] = s.decode_s_base / s.decode_s
    order = [*keys[:-2], "new_tokens", "batch_size", "model"]
    return s.drop(columns=[f"{c}_base" for c in cols]).sort_values(order, ignore_index=True)


def memory_table(df: pd.DataFrame) -> pd.DataFrame:
    """Weights and peak memory per model and batch size (OOM settings shown as such)."""
    cols = [c for c in ("shape", "model", "batch_size", "new_tokens", "params", "weights_mb", "peak_mem_mb", "peak_growth_mb",
                        "mem_source", "status") if c in df]
    agg = {c: "max" for c in ("params", "weights_mb", "peak_mem_mb", "peak_growth_mb") if c in df}
    agg.update({c: "first" for c in ("mem_source", "status") if c in df})
    return df[cols].groupby(["model", *_setting_keys(df)], as_index=False).agg(agg)
