"""The recovery registry: the CLI's choices and dispatch, unknown names, composites, registration rules.

The methods' functions are replaced by recorders (``monkeypatch`` on the registry entry), so each
test checks what a method *receives* from the CLI or a chain, in milliseconds, without training.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from shortened_llm import retrain
from shortened_llm.lessons import recovery_table
from shortened_llm.recovery import RECOVERY_METHODS, RecoveryMethod, get_recovery, recovery_methods, register_recovery
from shortened_llm.trainer import RetrainResult


def record_calls(monkeypatch, *names, seconds=1.0, steps=2):
    """Replace each method's function by one that records ``(name, args, kwargs)`` and returns a result."""
    calls = []
    for name in names:
        def run(*args, _name=name, out_dir=None, **kwargs):
            calls.append((_name, args, {"out_dir": out_dir, **kwargs}))
            return RetrainResult(model="M", tokenizer="T", out_dir=Path(out_dir), method=_name, steps=steps,
                                 seconds=seconds, log=[{"loss": 3.0}, {"loss": 2.5}])
        monkeypatch.setitem(RECOVERY_METHODS, name, dataclasses.replace(get_recovery(name), run=run))
    return calls


def test_the_cli_choices_are_the_single_methods_in_the_papers_order_then_the_others():
    assert recovery_methods(cli=True) == ("lora", "cpt", "cpt-lora", "kd", "partial", "replaceme")
    assert recovery_methods() == (*recovery_methods(cli=True), "replaceme+lora", "replaceme+kd")


# What the CLI passed each function before the registry (cli.py's if/elif), at the flags' defaults:
# None-valued flags are left out, so the function's own default (None, or ReplaceMe's seed 1234) holds.
TRAINING = {"preset": "smoke", "resume": True, "overwrite": False}
CLI_DEFAULTS = {
    "lora": ((), {**TRAINING, "data": "alpaca"}),
    "cpt": ((), TRAINING),  # no --data: the preset's cpt_data decides (c4; slimpajama in paper)
    "cpt-lora": ((), TRAINING),
    "kd": (("teacher",), {**TRAINING, "dataset": "c4", "temperature": 1.0, "alpha": 0.0, "hidden_loss": False,
                          "lora": False}),
    "partial": ((), {**TRAINING, "dataset": "c4", "last_k": 3}),
    "replaceme": (("teacher",), {"overwrite": False, "dataset": "bookcorpus", "n_samples": 256,
                                 "objective": "lstsq", "ridge": 0.1}),
}


@pytest.mark.parametrize("name", list(CLI_DEFAULTS))
def test_every_cli_choice_reaches_its_function_with_the_old_defaults(monkeypatch, tmp_path, capsys, name):
    from shortened_llm.cli import main

    calls = record_calls(monkeypatch, name)
    out = tmp_path / "out"
    teacher, expected = CLI_DEFAULTS[name]
    assert main(["retrain", name, "--model", "m", "--out", str(out), "--teacher", "teacher"]) == 0
    (called, args, kwargs), = calls
    assert called == name and args == ("m", *teacher, None)
    assert kwargs == {"out_dir": str(out), **expected}
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"method": name, "out": str(out), "steps": 2, "seconds": 1.0, "first_loss": 3.0, "last_loss": 2.5}


@pytest.mark.parametrize("name, given", [
    ("lora", {"max_steps": 5, "seed": 7}), ("kd", {"max_steps": 5, "seed": 7}),
    ("cpt-lora", {"cpt_steps": 5, "lora_steps": 5, "seed": 7}),  # --max-steps is each stage's
    ("replaceme", {"seed": 7, "n_samples": 4, "dataset": "c4"}),  # no steps: training-free
])
def test_flags_reach_the_keywords_they_name(monkeypatch, tmp_path, name, given):
    from shortened_llm.cli import main

    calls = record_calls(monkeypatch, name)
    argv = ["retrain", name, "--model", "m", "--out", str(tmp_path / "o"), "--teacher", "t", "--max-steps", "5",
            "--seed", "7", "--calibration-samples", "4", "--data", "c4"]
    assert main(argv) == 0
    kwargs = calls[0][2]
    assert {k: kwargs[k] for k in given} == given and ("max_steps" in kwargs) == ("max_steps" in given)


def test_a_method_with_a_teacher_says_which_one_when_it_is_missing(capsys, tmp_path):
    from shortened_llm.cli import main

    assert main(["retrain", "kd", "--model", "m", "--out", str(tmp_path / "o")]) == 2
    assert "retrain kd needs --teacher: the dense model the student was pruned from" in capsys.readouterr().err
    with pytest.raises(ValueError, match="recovery method 'kd' needs teacher="):
        get_recovery("kd")("m", out_dir=tmp_path / "o")


def test_an_unknown_method_gets_did_you_mean(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown recovery method 'lroa'\. Did you mean 'lora'\? Available: lora, cpt"):
        get_recovery("lroa")
    with pytest.raises(ValueError, match="Did you mean 'lora'"):
        retrain.retrain_or_load("lroa", None, None, tmp_path / "o")
    with pytest.raises(ValueError, match=r"Unknown recovery method 'replacme\+kd'\. Did you mean 'replaceme\+kd'"):
        recovery_table.recover(tmp_path, "replacme+kd", tmp_path / "row")


def test_a_composite_runs_its_parts_in_order_each_from_the_last_output(monkeypatch, tmp_path):
    calls = record_calls(monkeypatch, "replaceme", "kd", "lora", seconds=1.5)
    out = tmp_path / "rm-kd"
    result = get_recovery("replaceme+kd")("pruned", None, out, teacher="dense", preset="tiny", max_steps=3,
                                          overwrite=True)
    assert [c[0] for c in calls] == ["replaceme", "kd"]
    (_, rm_args, rm_kwargs), (_, kd_args, kd_kwargs) = calls
    first = tmp_path / "rm-kd.replaceme"  # <out>.<stage>, as cpt_then_lora's <out>.cpt
    assert rm_args == ("pruned", "dense", None) and rm_kwargs == {"out_dir": first, "overwrite": True}  # no budget
    assert kd_args == (str(first), "dense", None)
    assert kd_kwargs == {"out_dir": out, "preset": "tiny", "max_steps": 3, "overwrite": True}
    assert (result.method, result.seconds, result.steps) == ("replaceme+kd", 3.0, 2)
    calls.clear()
    get_recovery("replaceme+lora")("pruned", None, out, teacher="dense", stage_dirs={"replaceme": tmp_path / "r"})
    assert calls[0][2]["out_dir"] == tmp_path / "r" and calls[1][1] == (str(tmp_path / "r"), None)  # lora: no teacher


def test_registration_refuses_a_second_method_of_the_same_name_and_an_empty_one():
    with pytest.raises(ValueError, match="'lora' is registered already"):
        register_recovery(RecoveryMethod("lora", "another LoRA", run=print))
    with pytest.raises(ValueError, match="either run= or chain="):
        register_recovery(RecoveryMethod("nothing", "runs nothing"))
    assert "nothing" not in RECOVERY_METHODS
    with pytest.raises(ValueError, match="'cpt-lora' takes no dataset"):
        get_recovery("cpt-lora")("m", None, "o", data="c4")


def test_each_methods_default_dataset_is_its_functions_default():
    """The CLI fills ``--data`` from ``RecoveryMethod.data``: it must say what the function would use anyway."""
    import inspect

    for name in recovery_methods(cli=True):
        method = get_recovery(name)
        if method.data_keyword is not None:
            assert inspect.signature(method.run).parameters[method.data_keyword].default == method.data, name
    assert get_recovery("replaceme+kd").needs_teacher and not get_recovery("replaceme+kd").on_cli
