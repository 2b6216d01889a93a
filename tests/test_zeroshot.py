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


def test_cli_rejects_unknown_task(capsys):
    from shortened_llm.cli import main

    assert main(["eval", "zeroshot", "--tasks", "bolq"]) == 2
    assert "Did you mean 'boolq'" in capsys.readouterr().err


# ---- the claims table ---------------------------------------------------------------------------

def _ppl_rows(values: dict) -> "pd.DataFrame":
    import pandas as pd

    return pd.DataFrame([{"model": m, "dataset": "wikitext2", "bos": "once", "ppl": v} for m, v in values.items()])


def _zs_rows(acc: dict, stderr: float = 0.01, limit=500):
    import pandas as pd

    return pd.DataFrame([{"model": m, "task": t, "value": a, "stderr": stderr, "limit": limit}
                         for m, a in acc.items() for t in PAPER_TASKS])


def test_claims_say_missing_without_runs():
    from shortened_llm.claims import CLAIMS, claims_table

    table = claims_table()
    assert list(table.claim) == [c.name for c in CLAIMS]
    assert (table.held == "missing").all() and table.numbers.str.len().gt(0).all()


def test_claims_follow_the_numbers():
    import pandas as pd

    from shortened_llm.claims import claims_table

    ppl = _ppl_rows({"dense": 20.0, "ppl-0.20": 30.0, "taylor+-0.20": 45.0, "retrained/lora": 25.0, "retrained/cpt": 22.0})
    eff = pd.DataFrame({"model": ["dense", "depth-0.20", "width-0.20"], "batch_size": [1, 1, 1],
                        "latency_s": [1.0, 0.8, 0.99]})
    held = claims_table(ppl, _zs_rows({"taylor+-0.20": 0.50, "ppl-0.20": 0.40}), eff).set_index("claim").held
    assert held.to_dict() == {"ppl_best_ppl": "yes", "taylor_best_zero_shot": "yes", "lora_recovers_ppl": "yes",
                              "cpt_beats_lora": "yes", "depth_faster_batch1": "yes"}
    # reversed numbers flip the verdicts; a gap under two standard errors is flagged as noise
    ppl = _ppl_rows({"ppl-0.20": 50.0, "taylor+-0.20": 45.0, "retrained/lora": 60.0, "retrained/cpt": 70.0})
    zs = _zs_rows({"taylor+-0.20": 0.40, "ppl-0.20": 0.41}, stderr=0.05, limit=25)
    table = claims_table(ppl, zs, eff.assign(latency_s=[1.0, 0.99, 0.8])).set_index("claim")
    assert table.held.to_dict() == {"ppl_best_ppl": "no", "taylor_best_zero_shot": "no (within noise)",
                                    "lora_recovers_ppl": "no", "cpt_beats_lora": "no", "depth_faster_batch1": "no"}
    assert "limit 25" in table.numbers["taylor_best_zero_shot"]


def test_cpt_vs_lora_is_judged_at_the_most_severe_shared_ratio():
    from shortened_llm.claims import claims_table

    # LoRA wins at 20 %, CPT at 50 %; cpt-lora (best of all) must not count as CPT
    ppl = _ppl_rows({"ppl-0.20": 30.0, "retrained/lora-0.20": 25.0, "retrained/cpt-0.20": 27.0,
                     "retrained/lora-0.50": 90.0, "retrained/cpt-0.50": 60.0, "retrained/cpt-lora-0.50": 10.0,
                     "retrained/cpt-lora-0.20": 5.0})
    table = claims_table(ppl).set_index("claim")
    assert table.held["cpt_beats_lora"] == "yes"
    assert table.numbers["cpt_beats_lora"].startswith("at 50%") and "cpt-lora" not in table.numbers["cpt_beats_lora"]
    # LoRA recovery is judged at 20 %, against the 20 % pruned model
    assert table.held["lora_recovers_ppl"] == "yes" and "lora-0.50" not in table.numbers["lora_recovers_ppl"]
    worse = _ppl_rows({"retrained/lora-0.50": 50.0, "retrained/cpt-0.50": 60.0, "retrained/cpt-0.20": 1.0,
                       "retrained/lora-0.20": 2.0})
    assert claims_table(worse).set_index("claim").held["cpt_beats_lora"] == "no"


def test_run_models_lists_finished_retrained_models_only(tmp_path):
    from shortened_llm.claims import run_models

    for name in ("lora-0.20", "cpt-lora-0.50", "cpt-lora-0.50.cpt", "cpt-0.50.checkpoints", ".tmp-lora"):
        (tmp_path / "retrained" / name).mkdir(parents=True)
    labels = list(run_models(tmp_path, criteria=("ppl",)))
    assert labels == ["dense", "ppl-0.20", "retrained/cpt-lora-0.50", "retrained/lora-0.20"]


def test_load_run_tables_prefers_more_documents(tmp_path):
    from shortened_llm.claims import load_run_tables

    (tmp_path / "run" / "eval").mkdir(parents=True)
    _zs_rows({"dense": 0.5}, limit=4).to_csv(tmp_path / "run" / "eval" / "zeroshot.csv", index=False)
    (tmp_path / "results").mkdir()
    _zs_rows({"dense": 0.6}, limit=25).to_csv(tmp_path / "results" / "zeroshot_m.csv", index=False)
    assert set(load_run_tables(tmp_path / "run", tmp_path / "results")["zeroshot"]["limit"]) == {25}
    assert set(load_run_tables(tmp_path / "run")["zeroshot"]["limit"]) == {4}


def test_ppl_table_writes_each_row_and_resumes_where_it_stopped(tmp_path, monkeypatch, embedded):
    """At the cpu preset the table is an hour of work: a run cut short keeps what it measured."""
    import pandas as pd
    from conftest import make_tiny_llama

    from shortened_llm import claims, evaluate

    tiny = make_tiny_llama(vocab_size=len(embedded[1]))
    calls = []
    real = evaluate.perplexity

    def counting(model, tokenizer, dataset, **kw):
        calls.append((dataset, kw["bos"]))
        if len(calls) == 3 and crash:
            raise KeyboardInterrupt
        return real(model, tokenizer, dataset, **kw)

    monkeypatch.setattr("shortened_llm.evaluate.perplexity", counting)
    models = {"a": (tiny, embedded[1]), "b": (tiny, embedded[1])}
    kw = dict(seq_len=16, max_segments=2, batch_size=2, datasets=("wikitext2",))
    out = tmp_path / "ppl.csv"
    crash = True
    with pytest.raises(KeyboardInterrupt):
        claims.ppl_table(models, out, **kw)
    assert len(pd.read_csv(out)) == 2  # the two rows measured before the interruption
    crash, calls[:] = False, []
    table = claims.ppl_table(models, out, **kw)
    assert calls == [("wikitext2", "once"), ("wikitext2", "per-segment")]  # only model b's rows
    assert list(table.model) == ["a", "a", "b", "b"] and table.ppl.notna().all()
    assert table.ppl.iloc[0] == table.ppl.iloc[2]  # same model, same rows: same number whether cached or not
    calls[:] = []
    claims.ppl_table(models, out, **{**kw, "max_segments": 3})  # another budget is another row
    assert len(calls) == 4 and len(pd.read_csv(out)) == 8
    assert claims.ppl_table(models, out, **kw).equals(table) and len(calls) == 4
