"""Faults and bad input (issue 22): nothing of the user's lost, nothing half-written, every error names the fix.

Each test injects one fault or one bad input into a real write or load on a tiny random
Llama and checks what is left on disk, byte for byte, and what the user is told.
"""
import json

import pytest

from shortened_llm import remove_blocks, save_model
from shortened_llm.artifacts import MANIFEST, atomic_dir
from shortened_llm.cli import main
from shortened_llm.errors import ForeignDirError
from tests.conftest import make_tiny_llama


def pruned_tiny():
    """A 4-block tiny Llama with blocks [1, 2] removed: its dir gets a pruning.json."""
    return remove_blocks(make_tiny_llama(), [1, 2], criterion="ppl", ratio=0.5)


def snapshot(folder):
    """Every file under ``folder`` with its bytes: what a fault must leave untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(err):
    """The CLI's error once a model loaded (its progress bars come first): the one line, no traceback."""
    assert "Traceback" not in err
    last = err.strip().split("\n")[-1]
    assert last.startswith("shortened-llm: error: ")
    return last


# ---- 1. never delete what is not ours ---------------------------------------------------------

def users_dir(tmp_path):
    """A folder like ~/Documents: the user's files, nothing of ours."""
    docs = tmp_path / "Documents"
    (docs / "thesis").mkdir(parents=True)
    (docs / "notes.txt").write_text("mine\n")
    (docs / "thesis" / "draft.tex").write_text("\\section{Intro}\n")
    return docs


@pytest.mark.parametrize("overwrite", [True, False])
def test_save_never_replaces_a_users_dir(tmp_path, overwrite):
    docs = users_dir(tmp_path)
    before = snapshot(docs)
    with pytest.raises(ForeignDirError, match=r"notes\.txt.*never replaced.*Fix: give a new or empty directory"):
        save_model(make_tiny_llama(), None, docs, overwrite=overwrite)
    assert snapshot(docs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Documents"]  # no temp dir left beside it


def test_a_file_the_user_added_to_our_dir_stops_overwrite(tmp_path):
    out = save_model(pruned_tiny(), None, tmp_path / "pruned")
    (out / "my_eval.csv").write_text("ppl\n17.2\n")
    before = snapshot(out)
    with pytest.raises(ForeignDirError, match="1 entries shortened_llm did not write \\(my_eval.csv\\)"):
        save_model(pruned_tiny(), None, out, overwrite=True)
    assert snapshot(out) == before


def test_overwrite_replaces_our_dir_an_empty_dir_and_a_dir_from_before_the_manifest(tmp_path):
    ours = save_model(make_tiny_llama(), None, tmp_path / "ours")
    assert MANIFEST in {p.name for p in ours.iterdir()}
    written = json.loads((ours / MANIFEST).read_text())["entries"]
    assert "config.json" in written and "model.safetensors" in written
    (tmp_path / "empty").mkdir()
    legacy = save_model(pruned_tiny(), None, tmp_path / "legacy")
    (legacy / MANIFEST).unlink()  # as an earlier version wrote it: config.json + pruning.json
    for out in (ours, tmp_path / "empty", legacy):
        save_model(make_tiny_llama(num_layers=3), None, out, overwrite=True)
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
        assert not (out / "pruning.json").exists()  # replaced as a whole, not merged


def test_a_model_dir_without_any_record_of_ours_is_refused(tmp_path):
    """A plain HF dir without manifest or pruning/training record may be a user's download: kept."""
    hf = save_model(make_tiny_llama(), None, tmp_path / "hf")
    (hf / MANIFEST).unlink()
    with pytest.raises(ForeignDirError, match="no .shortened_llm.json"):
        save_model(make_tiny_llama(), None, hf, overwrite=True)
    assert (hf / "model.safetensors").exists()


def test_a_file_or_a_link_at_the_output_path_is_refused(tmp_path):
    (tmp_path / "model").write_text("a file\n")
    docs = users_dir(tmp_path)
    (tmp_path / "link").symlink_to(docs)
    for path, why in [(tmp_path / "model", "is a file"), (tmp_path / "link", "is a symbolic link")]:
        with pytest.raises(ForeignDirError, match=why):
            with atomic_dir(path, overwrite=True) as tmp:
                (tmp / "x").write_text("x")
    assert (tmp_path / "model").read_text() == "a file\n" and (docs / "notes.txt").read_text() == "mine\n"
    assert (tmp_path / "link").resolve() == docs


@pytest.mark.parametrize("argv", [
    ["prune", "--model", "no-such-model", "--ratio", "0.2"],
    ["prune", "--model", "no-such-model", "--method", "width"],
    ["prune", "--model", "no-such-model", "--unit", "attn", "--criterion", "ppl"],
    ["retrain", "lora", "--model", "no-such-model"],
])
def test_cli_overwrite_keeps_the_users_files_and_says_why_before_loading(capsys, tmp_path, argv):
    docs = users_dir(tmp_path)
    before = snapshot(docs)
    code, out, err = run_cli(capsys, *argv, "--out", docs, "--overwrite")
    assert code == 2 and out == ""
    assert err.startswith("shortened-llm: error: ") and err.count("\n") == 1  # one line, no traceback
    assert "never replaced" in err and "Unknown model" not in err  # refused before the model was looked up
    assert snapshot(docs) == before


# ---- 2. kill -9 anywhere in a write, then run again ---------------------------------------------

# A child process saves a new model over an old one and SIGKILLs itself at one point of the
# write: inside the block (weights written, no manifest yet), at the rename of the old dir
# away, between that rename and the rename of the new one in, or while deleting the old one.
KILL_CHILD = r"""
import os, shutil, signal, sys
from pathlib import Path
from transformers import PreTrainedModel
from shortened_llm import save_model
sys.path.insert(0, "tests")  # conftest's own imports
from tests.conftest import make_tiny_llama

out, point = Path(sys.argv[1]), sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_save, real_rename, real_rmtree = PreTrainedModel.save_pretrained, os.rename, shutil.rmtree

def save_pretrained(self, *a, **k):
    real_save(self, *a, **k)
    if point == "write":
        die()

def rename(src, dst, *a, **k):
    if point == "old-away" and ".old-" in Path(dst).name or point == "between" and Path(dst) == out:
        die()
    return real_rename(src, dst, *a, **k)

def rmtree(path, *a, **k):
    if point == "clean-up" and ".old-" in Path(path).name:
        die()
    return real_rmtree(path, *a, **k)

PreTrainedModel.save_pretrained, os.rename, shutil.rmtree = save_pretrained, rename, rmtree
save_model(make_tiny_llama(seed=2), None, out, overwrite=True)
"""
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def killed_save(out, point):
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", KILL_CHILD, str(out), point], cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == -9, child.stderr  # killed where injected, not finished or failed otherwise


@pytest.mark.parametrize("point, left_at_path", [
    ("write", "old"), ("old-away", "old"), ("between", None), ("clean-up", "new"),
])
def test_a_save_killed_anywhere_is_undone_or_finished_by_the_next_run(tmp_path, point, left_at_path):
    new = snapshot(save_model(make_tiny_llama(seed=2), None, tmp_path / "uninterrupted"))
    work = tmp_path / "work"
    out = save_model(make_tiny_llama(seed=1), None, work / "model")
    old = snapshot(out)
    killed_save(out, point)
    leftovers = sorted(p.name for p in work.iterdir() if p.name != "model")
    assert leftovers and all(n.startswith((".model.tmp-", ".model.old-")) for n in leftovers)
    # what the kill left at the path: the old model, the new one, or (cut between the renames) nothing
    assert {"old": old, "new": new, None: {}}[left_at_path] == (snapshot(out) if out.exists() else {})

    with pytest.raises(FileExistsError, match="overwrite"):  # the next start puts the last finished model back
        save_model(make_tiny_llama(seed=2), None, out)
    assert snapshot(out) == (new if left_at_path == "new" else old)
    assert [p.name for p in work.iterdir()] == ["model"]  # the dead writer's temp and backup are gone
    save_model(make_tiny_llama(seed=2), None, out, overwrite=True)
    assert snapshot(out) == new and [p.name for p in work.iterdir()] == ["model"]


def test_an_error_between_the_two_renames_puts_the_old_dir_back(tmp_path, monkeypatch):
    import os

    out = save_model(make_tiny_llama(seed=1), None, tmp_path / "model")
    old = snapshot(out)
    real_rename = os.rename

    def rename(src, dst):
        if dst == out and ".tmp-" in str(src):  # the new dir's rename in, after the old one moved away
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        save_model(make_tiny_llama(seed=2), None, out, overwrite=True)
    assert snapshot(out) == old and [p.name for p in tmp_path.iterdir()] == ["model"]


LIVE_WRITER = r"""
import sys, time
from pathlib import Path
from shortened_llm.artifacts import atomic_dir

out, ready = Path(sys.argv[1]), Path(sys.argv[2])
with atomic_dir(out, overwrite=True) as tmp:
    (tmp / "weights.bin").write_bytes(b"child")
    ready.touch()
    while ready.exists():  # the parent deletes it once its own write is done
        time.sleep(0.05)
"""


def test_a_live_writers_temp_dir_is_not_taken_for_a_dead_ones(tmp_path):
    """Two writers of one path: the second one's clean-up leaves the first one's temp dir alone."""
    import subprocess
    import sys
    import time

    out, ready = tmp_path / "model", tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(out), str(ready)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the child writer never got inside its write"
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "weights.bin").write_bytes(b"parent")
        assert (out / "weights.bin").read_bytes() == b"parent"
        ready.unlink()
        assert child.wait(timeout=120) == 0
    finally:
        child.kill()
    assert (out / "weights.bin").read_bytes() == b"child"  # its temp dir survived and became the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_dead_writers_temp_file_goes_and_a_live_ones_and_the_users_stay(tmp_path):
    """Temp files of atomic_file (scores CSVs, GGUFs): only an unlocked one of the exact temp name is removed."""
    import torch

    from shortened_llm.artifacts import atomic_file, save_scores

    out = tmp_path / "scores.csv"
    dead = tmp_path / ".scores.csv.k2x9q0ab.tmp"  # what mkstemp named it; its writer got kill -9: no flock held
    dead.write_text("block,sco")
    users = [tmp_path / ".scores.csv.mine.tmp", tmp_path / "scores.csv.bak", tmp_path / ".q1w2e3r4.tmp"]
    for path in users:
        path.write_text("mine\n")
    with atomic_file(out) as live:  # another writer of the same file, still working
        live.write_text("block,score\n0,1.0\n")
        save_scores(out, torch.tensor([0.5, 0.25]))
        assert live.exists() and not dead.exists()
    assert out.read_text() == "block,score\n0,1.0\n"  # the live writer finished last
    assert all(p.read_text() == "mine\n" for p in users)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["scores.csv", *(p.name for p in users)])


# ---- 3. artifacts get the user's umask -------------------------------------------------------

@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_artifacts_get_the_users_umask(tmp_path, umask, file_mode, dir_mode):
    import os
    import stat

    import torch

    from shortened_llm.artifacts import atomic_file, save_scores

    old = os.umask(umask)
    try:
        model_dir = save_model(pruned_tiny(), None, tmp_path / "run" / "pruned")
        scores = save_scores(tmp_path / "run" / "scores" / "ppl.csv", torch.tensor([1.0, 2.0]))
        with atomic_file(tmp_path / "run" / "model.gguf") as tmp:  # export's GGUF writes
            tmp.write_bytes(b"GGUF")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(model_dir) == dir_mode
    assert {p.name: mode(p) for p in model_dir.iterdir()} == {p.name: file_mode for p in model_dir.iterdir()}
    assert mode(scores) == file_mode and mode(tmp_path / "run" / "model.gguf") == file_mode


# ---- 4. corrupt or mismatched inputs: one line naming the file, what is wrong, and the fix ------

def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


def write_json(path, obj):
    path.write_text(json.dumps(obj))


BAD_MODEL_DIRS = {  # what is done to a good model dir -> the error type, the file it names, and a word of why
    "safetensors cut in half": (lambda d: truncate(d / "model.safetensors", lambda n: n // 2),
                                "CorruptFileError", "model.safetensors", "truncated"),
    "safetensors cut in its header": (lambda d: truncate(d / "model.safetensors", lambda n: 5),
                                      "CorruptFileError", "model.safetensors", "header too small"),
    "safetensors empty": (lambda d: truncate(d / "model.safetensors", lambda n: 0),
                          "CorruptFileError", "model.safetensors", "truncated"),
    "config.json cut": (lambda d: truncate(d / "config.json", lambda n: n // 2),
                        "CorruptFileError", "config.json", "not valid JSON"),
    "config.json a list": (lambda d: write_json(d / "config.json", []), "CorruptFileError", "config.json", "not an object"),
    "config.json without model_type": (lambda d: write_json(d / "config.json", {"hidden_size": 32}),
                                       "CorruptFileError", "config.json", "transformers cannot read it"),
    "tokenizer_config.json cut": (lambda d: truncate(d / "tokenizer_config.json", lambda n: n - 3),
                                  "CorruptFileError", "tokenizer_config.json", "not valid JSON"),
    "pruning.json cut": (lambda d: (write_json(d / "pruning.json", {"original_num_blocks": 8, "removed_blocks": [1, 5]}),
                                    truncate(d / "pruning.json", lambda n: n - 2)),
                         "CorruptFileError", "pruning.json", "not valid JSON"),
    "pruning.json without a block count": (lambda d: write_json(d / "pruning.json", {"removed_blocks": [1]}),
                                           "CorruptFileError", "pruning.json", "needs original_num_blocks"),
    "pruning.json for another model": (lambda d: write_json(d / "pruning.json", {"original_num_blocks": 8, "removed_blocks": [1]}),
                                       "MismatchError", "pruning.json", "7 kept, but config.json has num_hidden_layers=6"),
}


@pytest.fixture
def model_copy(tmp_path, tiny_llama_dir):
    """A copy of the 6-block tiny Llama dir (with the embedded tokenizer) to break."""
    import shutil

    return shutil.copytree(tiny_llama_dir, tmp_path / "model")


@pytest.mark.parametrize("damage", BAD_MODEL_DIRS)
def test_a_broken_model_dir_is_one_line_naming_the_file_and_the_fix(capsys, model_copy, damage):
    from shortened_llm import errors
    from shortened_llm.models import load_model

    break_it, error, file, why = BAD_MODEL_DIRS[damage]
    break_it(model_copy)
    with pytest.raises(getattr(errors, error)) as caught:
        load_model(model_copy, device="cpu")
    assert caught.value.path == model_copy / file and why in caught.value.problem and "Fix: " in str(caught.value)
    code, out, err = run_cli(capsys, "eval", "ppl", "--model", model_copy, "--max-segments", 1)
    assert code == 2 and out == "" and err.count("\n") == 1  # one line from the CLI, no traceback
    assert str(model_copy / file) in err and why in err and "Fix: " in err


def test_a_pruning_record_that_agrees_with_the_config_still_loads(model_copy):
    from shortened_llm.models import load_model

    write_json(model_copy / "pruning.json", {"original_num_blocks": 8, "removed_blocks": [1, 5]})
    model, _ = load_model(model_copy, device="cpu")
    assert model.pruning.kept_blocks == [0, 2, 3, 4, 6, 7] and model.config.num_hidden_layers == 6


def test_a_broken_embedded_cache_says_to_delete_it(tmp_path, model_copy, monkeypatch):
    from shortened_llm.errors import CorruptFileError
    from shortened_llm.models import load_model

    monkeypatch.setenv("SHORTENED_LLM_CACHE", str(tmp_path))  # model_copy lies in the cache now
    truncate(model_copy / "model.safetensors", lambda n: n - 1)
    with pytest.raises(CorruptFileError, match="Fix: delete .*the next load_model converts the packaged model"):
        load_model(model_copy, device="cpu")


# ---- 5. bad values on the command line: refused by argparse, before any model loads ------------

BAD_VALUES = [  # (argv, what the error must say); --model never exists: nothing gets that far
    (["prune", "--ratio", "1.5"], "ratio=1.5 must be in (0, 1)"),
    (["prune", "--ratio", "0"], "ratio=0.0 must be in (0, 1)"),
    (["prune", "--ratio", "nan"], "ratio=nan must be in (0, 1)"),
    (["prune", "--ratio=-inf"], "ratio=-inf must be in (0, 1)"),
    (["prune", "--ratio", "a fifth"], "ratio='a fifth' is not a number"),
    (["prune", "--calib-samples", "0"], "--calib-samples: 0 must be a whole number >= 1"),
    (["prune", "--scores", "no-such.csv"], "--scores: 'no-such.csv' is not a file"),
    (["score", "--n", "-2"], "--n: -2 must be a whole number >= 1"),
    (["score", "--calib-samples", "2.5"], "--calib-samples: '2.5' is not a whole number"),
    (["eval", "ppl", "--seq-len", "1"], "--seq-len: 1 must be a whole number >= 2"),
    (["eval", "ppl", "--max-segments", "0"], "--max-segments: 0 must be a whole number >= 1"),
    (["eval", "ppl", "--batch-size", "-1"], "--batch-size: -1 must be a whole number >= 1"),
    (["eval", "zeroshot", "--limit", "0"], "--limit: 0 must be a whole number >= 1"),
    (["eval", "zeroshot", "--batch-size", "nan"], "--batch-size: 'nan' is not a whole number"),
    (["retrain", "lora", "--max-steps", "0"], "--max-steps: 0 must be a whole number >= 1"),
    (["retrain", "lora", "--max-steps", "1e3"], "--max-steps: '1e3' is not a whole number"),
    (["retrain", "lora", "--seed", "-1"], "--seed: -1 must be a whole number in 0..4294967295"),
    (["retrain", "lora", "--seed", str(2**64)], f"--seed: {2**64} must be a whole number in 0..4294967295"),
    (["retrain", "kd", "--temperature", "0"], "temperature=0.0 must be in (0, inf)"),
    (["retrain", "kd", "--temperature", "inf"], "temperature=inf must be in (0, inf)"),
    (["retrain", "kd", "--alpha", "1.01"], "alpha=1.01 must be in [0, 1]"),
    (["retrain", "kd", "--alpha", "nan"], "alpha=nan must be in [0, 1]"),
    (["retrain", "partial", "--last-k", "0"], "--last-k: 0 must be a whole number >= 1"),
]
NEEDS_OUT = {"score": "scores.csv", "prune": "pruned", "retrain": "retrained"}


@pytest.mark.parametrize("argv, message", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_and_exit_code_2_before_any_work(capsys, tmp_path, argv, message):
    out = ["--out", str(tmp_path / NEEDS_OUT[argv[0]])] if argv[0] in NEEDS_OUT else []
    code, stdout, err = run_cli(capsys, *argv, "--model", "no-such-model", *out)
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert message in err and "--help" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, parsed", [
    (["prune", "--ratio", "0.35", "--calib-samples", "4"], {"ratio": 0.35, "calib_samples": 4}),
    (["eval", "ppl", "--seq-len", "2", "--max-segments", "1"], {"seq_len": 2, "max_segments": 1}),
    (["retrain", "kd", "--alpha", "0", "--temperature", "2", "--seed", "0"], {"alpha": 0.0, "temperature": 2.0, "seed": 0}),
])
def test_good_values_parse_as_before(argv, parsed):
    from shortened_llm.cli import build_parser

    args = build_parser().parse_args([*argv, "--model", "m", *(["--out", "o"] if argv[0] in NEEDS_OUT else [])])
    assert {k: getattr(args, k) for k in parsed} == parsed
    assert all(type(getattr(args, k)) is type(v) for k, v in parsed.items())


# ---- 6. scores, runs, GGUFs and caches that do not fit: one line each ----------------------------

GOOD_SCORES = "block,score\n0,3.5\n1,2.25\n2,inf\n3,1.0\n"
BAD_SCORES = {  # CSV text -> the error type and a word of what is wrong
    "empty": ("", "CorruptFileError", "expected columns block,score"),
    "cut in a number": (GOOD_SCORES[:-3], "CorruptFileError", "half-written"),
    "cut after a comma": ("block,score\n0,3.5\n1,\n", "CorruptFileError", "is not a block number and a score"),
    "cut after a block": ("block,score\n0,3.5\n1\n", "CorruptFileError", "is not a block number and a score"),
    "other columns": ("layer,importance\n0,1\n", "CorruptFileError", "found 'layer,importance'"),
    "a block missing": ("block,score\n0,1\n2,3\n", "CorruptFileError", "not 0..1 once each"),
    "a block twice": ("block,score\n0,1\n0,3\n", "CorruptFileError", "not 0..1 once each"),
    "a NaN score": ("block,score\n0,nan\n1,2\n", "CorruptFileError", "NaN or -inf scores for blocks [0]"),
    "binary": ("\udcff\x00\x01", "CorruptFileError", "not a text file"),
}


@pytest.mark.parametrize("case", BAD_SCORES)
def test_a_broken_scores_csv_is_named_before_any_model_loads(capsys, tmp_path, case):
    from shortened_llm import errors
    from shortened_llm.artifacts import load_scores

    text, error, why = BAD_SCORES[case]
    path = tmp_path / "ppl.csv"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(getattr(errors, error), match=__import__("re").escape(why)) as caught:
        load_scores(path)
    assert caught.value.path == path and "Fix: " in str(caught.value)
    code, out, err = run_cli(capsys, "prune", "--model", "no-such-model", "--scores", path, "--out", tmp_path / "p")
    assert code == 2 and out == "" and err.count("\n") == 1 and why in err and "Unknown model" not in err


def test_scores_for_another_model_are_refused_by_prune(capsys, tmp_path, tiny_llama_dir):
    from shortened_llm.artifacts import load_scores, save_scores

    import torch

    path = save_scores(tmp_path / "ppl.csv", torch.tensor([3.0, 1.0, 2.0, 4.0]))  # 4 blocks; the model has 6
    assert load_scores(path, num_blocks=4).tolist() == [3.0, 1.0, 2.0, 4.0]
    code, out, err = run_cli(capsys, "prune", "--model", tiny_llama_dir, "--scores", path, "--n-blocks", 1,
                             "--out", tmp_path / "pruned")
    assert code == 2 and out == ""
    assert "scores 4 blocks, but the model has 6" in error_line(err) and not (tmp_path / "pruned").exists()
    (path.write_text(GOOD_SCORES.replace("3,1.0", "3,1.0\n4,9\n5,8")))
    code, out, err = run_cli(capsys, "prune", "--model", tiny_llama_dir, "--scores", path, "--n-blocks", 1,
                             "--out", tmp_path / "pruned")
    assert code == 0 and json.loads(out)["removed_blocks"] == [3]  # the lowest finite score; inf never goes


def test_non_finite_scores_name_the_criterion_and_the_blocks(tiny_llama, random_ids, monkeypatch):
    """An fp16 overflow: the criterion returns NaN/inf for live blocks; block_importance refuses to rank them."""
    import math

    import torch

    from shortened_llm import importance
    from shortened_llm.errors import NonFiniteError

    real = importance.CRITERIA["magnitude"]
    for bad in (math.nan, math.inf, -math.inf):
        def overflowed(model, input_ids=None, bad=bad):
            scores = real(model, input_ids)
            scores[[1, 3]] = bad
            return scores
        monkeypatch.setitem(importance.CRITERIA, "magnitude", overflowed)
        with pytest.raises(NonFiniteError, match=r"criterion 'magnitude\+' scored blocks \[1, 3\] as NaN or inf.*--dtype float32"):
            importance.block_importance(tiny_llama, None, "magnitude+")
    monkeypatch.setitem(importance.CRITERIA, "magnitude", real)
    assert torch.isfinite(importance.block_importance(tiny_llama, None, "magnitude")).all()


def test_inf_for_a_half_already_removed_is_not_an_overflow(tiny_llama, random_ids):
    import math

    from shortened_llm.importance import block_importance
    from shortened_llm.subblock import remove_sublayers

    remove_sublayers(tiny_llama, "attn", [2])
    scores = block_importance(tiny_llama, random_ids, "bi", unit="attn", progress=False)
    assert scores[2] == math.inf and all(math.isfinite(s) for i, s in enumerate(scores.tolist()) if i != 2)


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_a_nan_loss_stops_training_at_its_step(loss):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from shortened_llm.errors import NonFiniteError
    from shortened_llm.trainer import non_finite_loss_stop

    callback, state = non_finite_loss_stop(), TrainerState(global_step=7)
    args = TrainingArguments(output_dir="unused", report_to=[])
    assert callback.on_log(args, state, TrainerControl(), logs={"loss": 2.5, "grad_norm": 1.0}) is not None
    with pytest.raises(NonFiniteError, match=rf"training loss is {loss} at step 7.*float32"):
        callback.on_log(args, state, TrainerControl(), logs={"loss": loss})


def test_a_run_dir_from_another_model_is_refused(tmp_path, tiny_llama_dir, monkeypatch):
    import shutil

    from shortened_llm.errors import MismatchError
    from shortened_llm.pipeline import RUN_MANIFEST, pruned_model

    monkeypatch.setenv("SHORTENED_LLM_DATA", __import__("os").environ["SHORTENED_LLM_DATA"])
    run = tmp_path / "run"
    model, _ = pruned_model(str(tiny_llama_dir), run, ratio=0.2, preset="tiny", criterion="magnitude")
    made = json.loads((run / RUN_MANIFEST).read_text())
    assert made["model"] == str(tiny_llama_dir) and made["num_blocks"] == 6
    other = shutil.copytree(tiny_llama_dir, tmp_path / "other-model")
    before = snapshot(run)
    with pytest.raises(MismatchError, match=r"made from model .*tiny-llama', not .*other-model'.*a new run_dir"):
        pruned_model(str(other), run, ratio=0.2, preset="tiny", criterion="magnitude")
    again, _ = pruned_model(str(tiny_llama_dir), run, ratio=0.2, preset="tiny", criterion="magnitude")  # reused
    assert again.pruning.removed_blocks == model.pruning.removed_blocks and snapshot(run) == before


def damaged_gguf(tmp_path, data, how):
    path = tmp_path / f"{how}.gguf"
    path.write_bytes({"cut in half": data[: len(data) // 2], "one byte short": data[:-1], "cut in its header": data[:100],
                      "not a GGUF": b"PK\x03\x04" + data[4:], "empty": b"",
                      "a future version": data[:4] + (9).to_bytes(4, "little") + data[8:]}[how])
    return path


GGUF_DAMAGE = ["cut in half", "one byte short", "cut in its header", "not a GGUF", "empty", "a future version"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_llama_dir):
    from shortened_llm.export import export_gguf

    return export_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", quant="f32", progress=False)


@pytest.mark.parametrize("how", GGUF_DAMAGE)
def test_a_corrupt_gguf_is_named_before_llama_cpp_sees_it(tmp_path, tiny_gguf, how):
    from shortened_llm.errors import CorruptFileError
    from shortened_llm.llamacpp import check_gguf_file

    assert check_gguf_file(tiny_gguf) == tiny_gguf
    path = damaged_gguf(tmp_path, tiny_gguf.read_bytes(), how)
    with pytest.raises(CorruptFileError, match=r"(truncated|not a readable GGUF).*Fix: export it again") as caught:
        check_gguf_file(path)
    assert caught.value.path == path
    if how == "cut in half" and __import__("shortened_llm.llamacpp").llamacpp.llama_cpp_available():
        from shortened_llm.llamacpp import load_gguf

        with pytest.raises(CorruptFileError, match="is truncated"):
            load_gguf(path, n_ctx=16)


@pytest.mark.parametrize("text, why", [
    ("model,task\nppl,piqa\n", "lacks the column(s) acc"),
    ("", "is not a readable CSV (EmptyDataError)"),
    ('model,task,acc\n"ppl,piqa,0.5\n', "is not a readable CSV (ParserError)"),
])
def test_a_cached_eval_csv_missing_columns_is_named(tmp_path, text, why):
    from shortened_llm.artifacts import read_cached_csv
    from shortened_llm.errors import CorruptFileError

    path = tmp_path / "zeroshot.csv"
    path.write_text(text)
    with pytest.raises(CorruptFileError, match=__import__("re").escape(why) + ".*Fix: delete it"):
        read_cached_csv(path, ["model", "task", "acc"], "delete it: the rows are measured again")
    path.write_text("model,task,acc,extra\nppl,piqa,0.5,x\n")
    assert read_cached_csv(path, ["model", "task", "acc"], "unused").acc.tolist() == [0.5]


def test_a_cached_quant_table_csv_missing_columns_is_one_line_before_any_measurement(capsys, tmp_path, tiny_llama_dir):
    """``export quant-table --out`` reuses the rows of its CSV: one of another version (no ``ppl`` column) was a KeyError."""
    from shortened_llm.quant_table import COLUMNS

    out = tmp_path / "quant_table.csv"
    kept = [c for c in COLUMNS if c != "ppl"]
    out.write_text(",".join(kept) + "\n" + ",".join("x" for _ in kept) + "\n")
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "export", "quant-table", "--model", tiny_llama_dir, "--out", out, "--types", "f16")
    assert code == 2
    assert error_line(err) == (f"shortened-llm: error: {str(out)!r}: lacks the column(s) ppl of a finished-rows cache. "
                               f"Fix: delete {str(out)!r} (its rows are measured again) or pass another out_csv (CLI: --out)")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["quant_table.csv"]


@pytest.mark.parametrize("argv, message", [
    (["score", "--out", "{dir}"], "is a directory: give a file path"),
    (["score", "--out", "{file}/s.csv"], "is a file, not a folder"),
    (["export", "gguf", "--out", "{dir}"], "is a directory: give a file path"),
    (["export", "gguf", "--out", "{file}/m.gguf"], "is a file, not a folder"),
    (["prune", "--out", "{file}/pruned"], "is a file, not a folder"),
    (["retrain", "lora", "--out", "{file}/r"], "is a file, not a folder"),
    (["prune", "--out", "{file}"], "is a file, not a directory"),
    (["retrain", "lora", "--out", "{file}"], "is a file, not a directory"),
])
def test_an_out_path_that_cannot_be_written_is_refused_before_loading(capsys, tmp_path, argv, message):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("mine\n")
    argv = [a.format(dir=tmp_path / "d", file=tmp_path / "f") for a in argv]
    code, out, err = run_cli(capsys, *argv, "--model", "no-such-model")
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err and "Unknown model" not in err
    assert (tmp_path / "f").read_text() == "mine\n" and list((tmp_path / "d").iterdir()) == []


def test_a_checkpoint_killed_mid_save_is_dropped_and_the_one_before_resumes(tmp_path):
    """The Trainer writes trainer_state.json last: a checkpoint without a readable one was cut while saving."""
    from shortened_llm.trainer import last_complete_checkpoint

    for step, state in ((2, "{}"), (4, None), (6, '{"global_st')):  # complete, killed before the state, state cut
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"w")
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-10.tmp").mkdir()  # not a checkpoint name: left alone
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10.tmp", "checkpoint-2"]
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    assert last_complete_checkpoint(tmp_path) is None  # nothing complete: train from step 0
