"""One evaluation cache for every notebook and the claims table: a number measured once is read back.

Notebooks 06 and 09 score some of the same models (the dense one, the ``ppl`` and ``taylor+``
pruned ones) under the same protocol; each PPL or zero-shot number costs seconds to minutes.
An entry is keyed by **what the number depends on**, never by a label or a path:

- the model: a digest of every parameter and buffer (name, dtype, shape, bytes; ``weights_digest``),
  its config (the path it was loaded from left out), its dtype and train/eval mode; so a model
  pruned and saved by notebook 03 and the same blocks pruned by notebook 09 share their rows, and
  a model with one weight changed, or blocks skipped for a while (``prune.skipping_blocks``), does not;
- the protocol: for PPL the digest of the token ids themselves (dataset, tokenizer, seq_len, BOS
  rule and segment count all change them) plus those settings spelled out, and the batch size;
  for zero-shot the task, limit, batch size, BOS rule, tokenizer, the pack file's bytes and lm-eval's version.

Entries are one JSON file per key under ``<run_dir>/eval_cache/`` (``run_dir_cache``), written
atomically; a key is computed under ``artifacts.artifact_lock``, so two kernels asking for the same
number at once compute it once and the second reads it. The cache is off unless asked for:
``use(run_dir)`` for the process (a notebook's first cell), or ``$SHORTENED_LLM_EVAL_CACHE`` (a dir).
Whole training runs are keyed in the same store, by the same digests (``train_cache``, kind "training").
So are a criterion's block scores (``importance.scores_key``, kind "scores": notebooks 09 and 10 score
the same dense model on the same calibration ids) and a GGUF's PPL in llama.cpp
(``llamacpp.gguf_ppl_key``, kind "gguf_ppl": keyed by the file's bytes, not its name).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from .artifacts import artifact_lock, atomic_write_text
from .errors import CorruptFileError

__all__ = ["ENV_VAR", "CACHE_DIR", "EvalCache", "run_dir_cache", "use", "active", "resolve", "weights_digest",
           "model_key", "tensor_digest", "tokenizer_digest", "file_digest"]

ENV_VAR = "SHORTENED_LLM_EVAL_CACHE"  # a dir: the cache every evaluation of this process uses
CACHE_DIR = "eval_cache"  # in a run dir
# config entries that say where a model came from, not what it computes
_PROVENANCE = ("_name_or_path", "transformers_version", "architectures")
_active: list["EvalCache | None"] = []  # set by `use`, innermost last


def _digest(update: Callable) -> str:
    h = hashlib.sha256()
    update(h)
    return h.hexdigest()


def _feed_tensor(h, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (e.g. the token ids a PPL is measured on)."""
    return _digest(lambda h: _feed_tensor(h, "", tensor))


def weights_digest(model) -> str:
    """SHA-256 over every parameter and buffer of ``model``: names, dtypes, shapes and bytes.

    Names count, so the same blocks at other positions, or a block list shortened for a while,
    give another digest. Tied weights are hashed once (``named_parameters`` dedups them). About
    0.3 s for the embedded 135M model; computed each time, because weights changed in place
    (``p.data``, a LoRA merge) leave no mark a memo could check.
    """
    def update(h):
        for name, p in model.named_parameters():
            _feed_tensor(h, name, p)
        for name, b in model.named_buffers():
            _feed_tensor(h, name, b)
    return _digest(update)


def _config_of(model) -> dict:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None:
        return {}
    return {k: v for k, v in config.to_dict().items() if k not in _PROVENANCE}


def model_key(model) -> dict:
    """What a number depends on in the model: its weights, config, dtype and train/eval mode."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    config = json.dumps(_config_of(model), sort_keys=True, default=str)
    return {"weights": weights_digest(model), "config": hashlib.sha256(config.encode()).hexdigest(),
            "dtype": "/".join(dtypes), "training": bool(model.training)}


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of what a tokenizer does: the fast tokenizer's full spec (vocab, merges, normalisers)
    where there is one, else its vocab; its class and special tokens in both cases."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps({"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
                           "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                           "padding_side": getattr(tokenizer, "padding_side", None)}, sort_keys=True, default=str)
    return _digest(lambda h: (h.update(spec.encode()), h.update(specials.encode())))


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (a pack's task file: another pack version is another protocol)."""
    def update(h):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return _digest(update)


def _canonical(key: dict) -> dict:
    """``key`` as it reads back from its JSON entry (tuples as lists, odd values as strings), so a
    stored key and a fresh one compare equal, and name the same file."""
    return json.loads(json.dumps(key, sort_keys=True, default=str))


class EvalCache:
    """Finished evaluation numbers under ``root``, one JSON file per key: ``{"key": ..., "value": ...}``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"EvalCache({str(self.root)!r})"

    def path(self, key: dict) -> Path:
        """The entry file of ``key``: its kind, then the SHA-256 of the key's canonical JSON."""
        text = json.dumps(_canonical(key), sort_keys=True)
        return self.root / f"{key.get('kind', 'eval')}-{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"

    def get(self, key: dict):
        """The cached value of ``key``, or ``None``. An entry whose stored key differs (a digest
        collision of the file name) counts as a miss; one that is not our JSON is refused."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            stored, value = entry["key"], entry["value"]
        except (ValueError, KeyError, TypeError):
            raise CorruptFileError(path, "is not an evaluation-cache entry (JSON with 'key' and 'value')",
                                   "delete it: the number is measured again on the next run") from None
        same = _canonical(key) == stored
        return value if same else None

    def put(self, key: dict, value, seconds: float | None = None) -> Path:
        path = self.path(key)
        entry = {"key": _canonical(key), "value": value,
                 "seconds": None if seconds is None else round(seconds, 3), "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        return atomic_write_text(path, json.dumps(entry, indent=1, default=str) + "\n")

    def seconds_by_kind(self, since: float | None = None) -> dict[str, float]:
        """The seconds of work behind the entries written at ``since`` (epoch seconds) or later
        (``None``: every entry), summed per kind ("ppl", "zero_shot", "scores", "gguf_ppl",
        "training"): a measurement's own time, a training run's training time (in its value).

        A number read back adds nothing, so this is what a run really measured and trained: what
        ``reproduce`` reports its notebook time went to. Files that are not entries are left out
        (``get`` refuses them where a number is read)."""
        totals: dict[str, float] = {}
        for path in sorted(self.root.glob("*.json")):
            try:
                entry = json.loads(path.read_text())
                kind, value = entry["key"]["kind"], entry["value"]
                written = time.mktime(time.strptime(entry["written"], "%Y-%m-%d %H:%M:%S"))  # put()'s local time
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if since is not None and written < int(since):  # put() writes whole seconds
                continue
            seconds = value.get("seconds") if kind == "training" and isinstance(value, dict) else entry.get("seconds")
            totals[kind] = totals.get(kind, 0.0) + float(seconds or 0.0)
        return totals

    def get_or_compute(self, key: dict, compute: Callable[[], object]):
        """The cached value of ``key``, else ``compute()``'s, stored. The check and the compute
        run under the key's lock: a second process asking for it meanwhile waits and reads it."""
        value = self.get(key)
        if value is not None:
            return value
        path = self.path(key)
        with artifact_lock(path):
            value = self.get(key)
            if value is None:
                t0 = time.perf_counter()
                value = compute()
                self.put(key, value, time.perf_counter() - t0)
        return value


def run_dir_cache(run_dir: str | os.PathLike) -> EvalCache:
    """The cache of a run dir: ``<run_dir>/eval_cache/``, shared by every notebook using that run dir."""
    return EvalCache(Path(run_dir) / CACHE_DIR)


def use(run_dir: str | os.PathLike | None):
    """Turn the cache of ``run_dir`` on for this process (``None`` turns it off).

    Also a context manager: ``with use(run_dir): ...`` restores the previous setting on exit.
    """
    _active.append(None if run_dir is None else run_dir_cache(run_dir))
    depth = len(_active)

    @contextlib.contextmanager
    def restore():
        try:
            yield _active[-1]
        finally:
            del _active[depth - 1:]

    return restore()


def active() -> EvalCache | None:
    """The cache evaluations use when not told: the last ``use``, else ``$SHORTENED_LLM_EVAL_CACHE``, else none."""
    if _active:
        return _active[-1]
    root = os.environ.get(ENV_VAR)
    return EvalCache(root) if root else None


def resolve(cache) -> EvalCache | None:
    """An evaluation's ``cache=`` argument: ``None`` = the active one, ``False`` = none, an
    ``EvalCache`` as is, a path = the cache dir at that path."""
    if cache is None:
        return active()
    if cache is False:
        return None
    return cache if isinstance(cache, EvalCache) else EvalCache(cache)
