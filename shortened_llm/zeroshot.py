"""Zero-shot accuracy as the paper reports it (Section 4, Table 2), through lm-eval.

Seven tasks, lm-eval's stock prompts, targets and metrics; the paper reports ``acc_norm``
for HellaSwag, ARC-Challenge and OpenBookQA and ``acc`` for the rest. The scoring is
lm-eval's own (``HFLM`` wraps the in-memory model): nothing here re-implements it.

Where the data comes from:
- with the offline pack (``$SHORTENED_LLM_DATA``), our task YAMLs in ``shortened_llm/tasks/``
  ``include:`` the stock YAML and change only ``dataset_path/dataset_kwargs`` and the splits.
  ``include`` needs a real path and the pack's location is known only at run time, so the
  YAMLs are templates (``$stock``, ``$data``) rendered into a temporary directory;
- without it, lm-eval's stock task names (hub download or HF cache).

HellaSwag in the pack is a lossy substitute (no ctx_a/ctx_b split, see its SOURCES.md):
tables mark it with ``note="pack-substitute"``.
"""
from __future__ import annotations

import math
import tempfile
import time
from contextlib import ExitStack, contextmanager
from importlib import resources
from pathlib import Path
from string import Template

import pandas as pd
from tqdm.auto import tqdm

from . import eval_cache
from .artifacts import read_cached_csv
from .data import data_dir, set_offline_if_pack
from .errors import unknown_name

__all__ = [
    "PAPER_TASKS",
    "REPORTED_METRIC",
    "PACK_SUBSTITUTES",
    "zero_shot",
    "zero_shot_table",
    "check_tasks",
    "task_manager",
    "stock_tasks_dir",
    "average_row",
    "zero_shot_key",
]

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# Paper, Table 2 footnote: length-normalised accuracy where lm-eval's README recommends it
REPORTED_METRIC = {
    "boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
    "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm",
}
# Tasks whose pack file differs from the hub data, and why (shown in every table)
PACK_SUBSTITUTES = {"hellaswag": "pack-substitute"}


def stock_tasks_dir() -> Path:
    """lm-eval's own ``lm_eval/tasks`` folder, whose YAMLs ours include."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def check_tasks(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"tasks=[] is empty: pass one or more of {', '.join(PAPER_TASKS)}")
    for name in tasks:
        if name not in REPORTED_METRIC:
            raise unknown_name("zero-shot task", name, PAPER_TASKS)
    return tasks


def _render(tasks: list[str], pack: Path, out: Path) -> None:
    """Write our YAMLs for ``tasks`` into ``out`` with the stock and pack paths filled in."""
    stock = stock_tasks_dir()
    for value, what in ((stock, "lm-eval's tasks dir"), (pack, "SHORTENED_LLM_DATA")):
        if '"' in str(value) or "\\" in str(value):
            raise ValueError(f"{what} path {str(value)!r} contains a quote or backslash: move it to a plain path")
    for name in tasks:
        data_file = pack / "zeroshot" / f"{name}.jsonl"
        if not data_file.is_file():
            raise FileNotFoundError(
                f"zero-shot task {name!r}: {data_file} does not exist. Point SHORTENED_LLM_DATA to the "
                "offline pack (it holds zeroshot/<task>.jsonl), or unset it to use lm-eval's hub datasets."
            )
        template = Template(resources.files("shortened_llm.tasks").joinpath(f"{name}.yaml").read_text())
        (out / f"{name}.yaml").write_text(template.substitute(stock=stock, data=pack))


@contextmanager
def task_manager(tasks=PAPER_TASKS, pack: Path | None | str = "env"):
    """Yield an lm-eval ``TaskManager`` that resolves ``tasks`` by their stock names.

    ``pack="env"`` reads ``$SHORTENED_LLM_DATA``; with a pack our offline YAMLs are the only
    tasks indexed (so ``boolq`` is ours, not the hub one), without one the stock tasks are.
    """
    from lm_eval.tasks import TaskManager

    tasks = check_tasks(tasks)
    pack = data_dir() if pack == "env" else (Path(pack) if pack is not None else None)
    if pack is None:
        yield TaskManager(verbosity="ERROR")
        return
    set_offline_if_pack()
    with tempfile.TemporaryDirectory(prefix="shortened_llm_tasks-") as tmp:
        _render(tasks, pack, Path(tmp))
        yield TaskManager(include_path=tmp, include_defaults=False, verbosity="ERROR")


def _lm(model, tokenizer, batch_size):
    """lm-eval's HF wrapper around the in-memory model (no reload, no copy).

    BOS as the family says (``Family.zero_shot_bos``), never the tokenizer's default: left to
    the tokenizer (lm-eval 0.4.13 does), LLaMA's prepends BOS, which the official harness did not.
    """
    from lm_eval.models.huggingface import HFLM

    from .models import family_of

    if isinstance(model, HFLM):
        return model
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                add_bos_token=family_of(model).zero_shot_bos)


def average_row(table: pd.DataFrame) -> dict:
    """Mean of the reported metrics; its stderr treats the tasks as independent."""
    stderrs = table["stderr"].astype(float)
    se = math.sqrt((stderrs**2).sum()) / len(table) if stderrs.notna().all() else float("nan")
    limits = sorted({str(v) for v in table["limit"]})
    return {"task": "average", "metric": "mean", "value": float(table["value"].mean()), "stderr": se,
            "limit": limits[0] if len(limits) == 1 else "/".join(limits), "n_docs": int(table["n_docs"].sum()),
            "seconds": float(table["seconds"].sum()), "source": ",".join(sorted(set(table["source"]))),
            "note": ""}


def zero_shot(model, tokenizer=None, tasks=PAPER_TASKS, limit: int | None = None, batch_size: int | str = 16,
              average: bool = True, progress: bool = True, cache=None) -> pd.DataFrame:
    """Zero-shot accuracy on ``tasks`` with lm-eval; one row per task (and an ``average`` row).

    Columns: task, metric (the paper's), value, stderr, limit (``None`` = all documents),
    n_docs, seconds (wall time of that task), source (``pack`` or ``hub``), note.
    ``limit`` takes the first N documents of each task, as lm-eval's ``--limit`` does.
    Tasks run one at a time so each gets its own wall time, and each task's row is one entry of
    the evaluation cache (``cache``: ``eval_cache.resolve``; ``None`` = the active cache, if any):
    notebook 06's one-task calls and notebook 09's all-task ones share rows. ``zero_shot_key``
    says what the key holds; an lm-eval ``HFLM`` passed as ``model`` is never cached.
    """
    tasks = check_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a whole number >= 1 (documents per task) or None for all")
    pack = data_dir()
    source = "pack" if pack is not None else "hub"
    store = eval_cache.resolve(cache) if tokenizer is not None and not _is_hflm(model) else None
    base = zero_shot_key(model, tokenizer, limit=limit, batch_size=batch_size, source=source) if store else None
    lm = None
    rows = []
    with task_manager(tasks) as manager:
        for name in tqdm(tasks, desc="zero-shot", unit="task", disable=not progress):
            def measure(name=name):
                nonlocal lm
                lm = lm or _lm(model, tokenizer, batch_size)  # built only when a task is not cached
                return _task_row(lm, name, manager, limit, source)
            if store is None:
                rows.append(measure())
                continue
            data = eval_cache.file_digest(pack / "zeroshot" / f"{name}.jsonl") if pack is not None else "hub"
            rows.append(store.get_or_compute({**base, "task": name, "data": data}, measure))
    table = pd.DataFrame(rows)
    if average:
        table = pd.concat([table, pd.DataFrame([average_row(table)])], ignore_index=True)
    return table


def _is_hflm(model) -> bool:
    from lm_eval.models.huggingface import HFLM

    return isinstance(model, HFLM)


@contextmanager
def _no_environment_report():
    """lm-eval without its closing environment report: ``simple_evaluate`` ends by running
    ``pip list``, ``git describe`` and torch's ``collect_env`` in subprocesses (about 0.5 s a
    call, one call per task: 3.5 s of a model's 45 s at ``smoke``) for result fields no row
    reads. The scores are computed before it and do not change."""
    from unittest import mock

    import lm_eval.evaluator as evaluator

    with ExitStack() as stack:
        for name, skipped in (("add_env_info", lambda results: None), ("get_git_commit_hash", lambda: None)):
            if hasattr(evaluator, name):  # an lm-eval without them has nothing to skip
                stack.enter_context(mock.patch.object(evaluator, name, skipped))
        yield


def _task_row(lm, name: str, manager, limit: int | None, source: str) -> dict:
    """One task's row, scored by lm-eval (the only place a zero-shot number is computed)."""
    import lm_eval

    t0 = time.perf_counter()
    with _no_environment_report():
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit,
                                      num_fewshot=0, log_samples=False, verbosity="ERROR")
    seconds = time.perf_counter() - t0
    metric = REPORTED_METRIC[name]
    result = out["results"][name]
    stderr = result.get(f"{metric}_stderr,none")
    return {
        "task": name, "metric": metric, "value": float(result[f"{metric},none"]),
        "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
        "limit": limit, "n_docs": int(out["n-samples"][name]["effective"]), "seconds": round(seconds, 2),
        "source": source, "note": PACK_SUBSTITUTES.get(name, "") if source == "pack" else "",
    }


def zero_shot_key(model, tokenizer, **protocol) -> dict:
    """The evaluation-cache key of a zero-shot row, less its task and data file: the model
    (``eval_cache.model_key``), the tokenizer, the family's BOS rule, lm-eval's version and the
    protocol's settings (limit, batch size: lm-eval pads each batch, source)."""
    import lm_eval

    from .models import family_of

    return {"kind": "zero_shot", **eval_cache.model_key(model), "tokenizer": eval_cache.tokenizer_digest(tokenizer),
            "add_bos": family_of(model).zero_shot_bos, "lm_eval": lm_eval.__version__, **protocol}


# ---- a resumable results table over several models -----------------------------------------

def _write_csv(table: pd.DataFrame, path: Path) -> None:
    from .artifacts import atomic_write_text

    atomic_write_text(path, table.to_csv(index=False))


# what zero_shot_table reads back from its CSV to know a row is done, and shows
TABLE_COLUMNS = ("model", "task", "metric", "value", "stderr", "limit", "n_docs", "seconds", "source", "note")


def zero_shot_table(models: dict, out_csv, tasks=PAPER_TASKS, limit: int | None = None, batch_size: int | str = 16,
                    progress: bool = True, cache=None) -> pd.DataFrame:
    """Zero-shot rows for every ``model label -> loader()`` x task, appended to ``out_csv`` as they finish.

    A loader returns ``(model, tokenizer)``. Rows already in ``out_csv`` with the same label,
    task and limit are kept, not recomputed, so an interrupted background run resumes where it
    stopped (a CSV lacking a column of ``TABLE_COLUMNS`` is refused with ``CorruptFileError``); a row
    another notebook measured on the same model comes from the evaluation cache (``cache``, as in
    ``zero_shot``). Tasks are the outer loop: a run cut short still compares every model on the
    tasks it finished. A loader that raises ``LookupError`` (e.g. a criterion not available
    yet) is skipped for that task and tried again on the next one.
    """
    tasks = check_tasks(tasks)
    out_csv = Path(out_csv)
    done = (read_cached_csv(out_csv, TABLE_COLUMNS, f"delete {str(out_csv)!r} (its rows are measured again) or pass "
                            "another out_csv", keep_default_na=False) if out_csv.exists() else pd.DataFrame())
    key = "all" if limit is None else str(limit)

    def have(label, task):
        return len(done) and ((done["model"] == label) & (done["task"] == task) & (done["limit"].astype(str) == key)).any()

    loaded: dict = {}
    for task in tasks:
        for label, loader in models.items():
            if have(label, task):
                continue
            if label not in loaded:
                try:
                    loaded[label] = loader()
                except LookupError as err:
                    print(f"zero_shot_table: skipping {label!r} on {task!r} for now: {err}")
                    continue
            model, tokenizer = loaded[label]
            row = zero_shot(model, tokenizer, tasks=[task], limit=limit, batch_size=batch_size,
                            average=False, progress=progress, cache=cache).assign(model=label)
            row["limit"] = key
            done = pd.concat([done, row], ignore_index=True)
            _write_csv(done, out_csv)
    return done
