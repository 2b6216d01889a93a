"""Zero-shot through lm-eval: our offline tasks ask exactly what the stock tasks ask."""
from __future__ import annotations

import json
import math

import pytest

from shortened_llm.data import data_dir
from shortened_llm.zeroshot import (
    PACK_SUBSTITUTES,
    PAPER_TASKS,
    REPORTED_METRIC,
    stock_tasks_dir,
    task_manager,
    zero_shot,
)

STOCK_YAML = {
    "boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
}
N_DOCS = 4

needs_pack = pytest.mark.skipif(data_dir() is None or not (data_dir() / "zeroshot").is_dir(),
                                reason="needs the offline pack (SHORTENED_LLM_DATA)")


def _pack_docs(task: str, n: int) -> list[dict]:
    lines = (data_dir() / "zeroshot" / f"{task}.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def _stock_task(task: str, docs: list[dict]):
    """lm-eval's stock task definition, unchanged, with ``docs`` fed in place of its hub download."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(stock_tasks_dir() / STOCK_YAML[task], resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split")} - {None}

    class FromDocs(ConfigurableTask):
        def download(self, dataset_kwargs=None, **kwargs):
            self.dataset = datasets.DatasetDict({s: datasets.Dataset.from_list(docs) for s in splits})

    return FromDocs(config=cfg)


def _requests(task_obj) -> list[tuple]:
    task_obj.build_all_requests(limit=N_DOCS, rank=0, world_size=1)
    return [(inst.doc_id, inst.args) for inst in task_obj.instances]


@needs_pack
@pytest.mark.parametrize("task", PAPER_TASKS)
def test_offline_task_asks_what_the_stock_task_asks(task):
    with task_manager([task]) as manager:
        ours = manager.load([task])["tasks"][task]
        assert ours.config.dataset_path == "json"  # read from the pack, not the hub
        ours_requests = _requests(ours)
    stock_requests = _requests(_stock_task(task, _pack_docs(task, N_DOCS)))
    assert ours_requests == stock_requests
    assert len({doc_id for doc_id, _ in ours_requests}) == N_DOCS  # limit takes the first N docs
    for _, (context, continuation) in ours_requests:
        assert context and continuation.strip()


@needs_pack
def test_stock_hellaswag_preprocessing_works_on_the_pack_fields():
    """The pack has ctx_a = ctx and ctx_b = '': the stock process_docs still gives a clean query."""
    task = _stock_task("hellaswag", _pack_docs("hellaswag", 2))
    doc = task.validation_docs()[0]
    assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. he"  # no trailing space
    assert len(doc["choices"]) == 4 and doc["gold"] == 3
    assert PACK_SUBSTITUTES["hellaswag"] == "pack-substitute"


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown zero-shot task 'hellaswg'\. Did you mean 'hellaswag'\?.*boolq"):
        zero_shot(None, tasks=["hellaswg"])


@pytest.mark.parametrize("limit", [0, -3, 2.5])
def test_bad_limit(limit):
    with pytest.raises(ValueError, match=f"limit={limit}"):
        zero_shot(None, tasks=["piqa"], limit=limit)


def test_missing_task_file_names_path_and_fix(tmp_path):
    (tmp_path / "zeroshot").mkdir()
    with pytest.raises(FileNotFoundError, match=r"zeroshot/piqa\.jsonl does not exist.*SHORTENED_LLM_DATA"):
        with task_manager(["piqa"], pack=tmp_path):
            pass


def test_every_paper_task_has_a_template_and_a_metric():
    from importlib import resources

    assert set(REPORTED_METRIC) == set(PAPER_TASKS)
    assert {t for t, m in REPORTED_METRIC.items() if m == "acc_norm"} == {"hellaswag", "arc_challenge", "openbookqa"}
    for task in PAPER_TASKS:
        text = resources.files("shortened_llm.tasks").joinpath(f"{task}.yaml").read_text()
        assert STOCK_YAML[task] in text  # ours includes the stock definition


@needs_pack
def test_zero_shot_table_on_embedded_model(embedded):
    model, tokenizer = embedded
    table = zero_shot(model, tokenizer, tasks=["winogrande", "hellaswag"], limit=2, batch_size=4, progress=False)
    assert list(table.task) == ["winogrande", "hellaswag", "average"]
    assert list(table.metric) == ["acc", "acc_norm", "mean"]
    tasks = table.iloc[:2]
    assert tasks.value.between(0, 1).all() and (tasks.n_docs == 2).all() and (tasks.limit == 2).all()
    assert table.value.iloc[2] == pytest.approx(tasks.value.mean())
    assert table.stderr.iloc[2] == pytest.approx(math.sqrt((tasks.stderr**2).sum()) / 2)
    assert list(table.note) == ["", "pack-substitute", ""]


@needs_pack
def test_a_task_is_scored_without_lm_evals_environment_report(embedded, monkeypatch):
    """lm-eval's closing report runs pip and git in subprocesses for fields no row reads: skipped,
    the score unchanged."""
    import subprocess

    import lm_eval.evaluator

    model, tokenizer = embedded
    args = dict(tasks=["winogrande"], limit=2, batch_size=4, progress=False, cache=False)
    before = zero_shot(model, tokenizer, **args)
    started = []
    real_popen = subprocess.Popen.__init__
    monkeypatch.setattr(subprocess.Popen, "__init__", lambda self, *a, **k: started.append(a) or real_popen(self, *a, **k))
    after = zero_shot(model, tokenizer, **args)
    assert started == []
    assert after.value.tolist() == before.value.tolist()
    lm_eval.evaluator.add_env_info({})  # what is skipped: it does start subprocesses
    assert started


def test_zero_shot_table_refuses_a_cached_csv_lacking_columns(tmp_path):
    """A CSV from another tool or version: the clear error naming the file, before any model loads."""
    from shortened_llm.errors import CorruptFileError
    from shortened_llm.zeroshot import zero_shot_table

    out_csv = tmp_path / "zeroshot.csv"
    out_csv.write_text("model,task\ndense,winogrande\n")

    def never():
        raise AssertionError("a model loaded before the cached CSV was checked")

    with pytest.raises(CorruptFileError, match=r"lacks the column\(s\) metric, value") as err:
        zero_shot_table({"dense": never}, out_csv, tasks=["winogrande"], limit=2)
    assert str(out_csv) in str(err.value)
