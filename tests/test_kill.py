"""Kill -9 anywhere, a full disk, two writers at once (issue 22, items 3-5), on real CLI runs.

A killed run is a child ``python -m shortened_llm ...`` that SIGKILLs itself at one fault point
(``artifacts.FAULT_ENV``: ``compute`` = scores computed, nothing written; ``write`` = the
artifact complete in its temp, not yet renamed in; ``swap`` = between ``atomic_dir``'s two
renames). After each kill: the artifact's path holds the previous artifact byte for byte, or
nothing (cut between the renames), never a part; the rerun (in this process) exits 0 and
writes exactly what an uninterrupted run writes; no temp file or dir is left beside it.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shortened_llm.artifacts import FAULT_ENV
from shortened_llm.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCORE = ["score", "--criterion", "ppl", "--preset", "tiny", "--calib-samples", "2"]
PRUNE = ["prune", "--criterion", "ppl", "--preset", "tiny", "--calib-samples", "2", "--overwrite"]


def snapshot(path):
    """Every byte at ``path`` (a file or a dir): what a kill must leave as it was."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def cli(*argv):
    assert main([str(a) for a in argv]) == 0


def killed(argv, point):
    """Run the CLI in a child that SIGKILLs itself at fault ``point`` (``name:n``): it must die there."""
    env = {**os.environ, FAULT_ENV: point, "SHORTENED_LLM_DTYPE": "float32", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-m", "shortened_llm", *map(str, argv)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=240)
    assert child.returncode == -9, child.stderr[-2000:]  # killed where injected, not finished or failed


# (command, fault point): every point the command passes. The old artifact at the path is
# another run's (other ratio / criterion / quant), so "intact" and "replaced" are told apart.
KILLS = [
    ("score", "compute:1"), ("score", "write:1"),
    ("prune", "compute:1"), ("prune", "write:1"), ("prune", "swap:1"),
    ("export", "write:1"),
]
FAST = {("score", "write:1"), ("prune", "swap:1")}  # one file kill and one dir kill in `make test`; the rest heavy


def command(kind, model, out, old=False):
    """The argv of ``kind`` on ``model`` into ``out``; ``old=True``: another run's artifact for the same path."""
    if kind == "score":
        return [*SCORE, "--model", model, "--out", out, *(["--criterion", "magnitude"] if old else [])]
    if kind == "prune":
        return [*PRUNE, "--model", model, "--out", out, "--n-blocks", 1 if old else 2]
    return ["export", "gguf", "--model", model, "--out", out, "--quant", "f32" if old else "f16", "--overwrite"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama_dir):
    """What each command writes when nothing kills it: computed once per kind."""
    done = {}

    def get(kind):
        if kind not in done:
            out = tmp_path_factory.mktemp("ref") / {"score": "s.csv", "prune": "pruned", "export": "m.gguf"}[kind]
            cli(*command(kind, tiny_llama_dir, out))
            done[kind] = snapshot(out)
        return done[kind]
    return get


@pytest.mark.parametrize("kind, point", [pytest.param(*k, marks=() if k in FAST else pytest.mark.heavy) for k in KILLS],
                         ids=[f"{k}-{p}" for k, p in KILLS])
def test_killed_anywhere_then_run_again(tmp_path, tiny_llama_dir, uninterrupted, kind, point):
    out = tmp_path / {"score": "scores.csv", "prune": "pruned", "export": "model.gguf"}[kind]
    cli(*command(kind, tiny_llama_dir, out, old=True))
    old = snapshot(out)
    killed(command(kind, tiny_llama_dir, out), point)
    left = snapshot(out) if out.exists() else None
    assert left == (None if point.startswith("swap") else old)  # never a part of the new artifact
    if not point.startswith("compute"):  # killed before writing, it leaves nothing; killed later ...
        assert {p.name for p in tmp_path.iterdir()} - {out.name}  # ... it left its temp behind, and ...
    cli(*command(kind, tiny_llama_dir, out))
    assert snapshot(out) == uninterrupted(kind)  # the rerun finished bit-identical
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # and cleared the dead writer's temps


# ---- a full disk -------------------------------------------------------------------------------

def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def half_then_full(write):
    """``write`` that writes half of what it was given, then finds the disk full."""
    def writer(path, data, *args, **kwargs):
        write(path, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")
    return writer


@pytest.mark.parametrize("kind", ["score", "prune", "export"])
def test_a_full_disk_is_one_line_and_the_previous_artifact_stays(capsys, monkeypatch, tmp_path, tiny_llama_dir, kind):
    import gguf
    import transformers.modeling_utils

    out = tmp_path / {"score": "scores.csv", "prune": "pruned", "export": "model.gguf"}[kind]
    cli(*command(kind, tiny_llama_dir, out, old=True))
    old = snapshot(out)
    if kind == "score":  # the CSV's text, cut in half by the full disk
        monkeypatch.setattr(Path, "write_text", half_then_full(Path.write_text))
    elif kind == "prune":  # safetensors' weights
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    else:  # the GGUF's tensor data, after its header went out
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    capsys.readouterr()
    assert main([str(a) for a in command(kind, tiny_llama_dir, out)]) == 2
    last = capsys.readouterr().err.strip().split("\n")[-1]
    assert last.startswith(f"shortened-llm: error: {str(out)!r}: the disk filled while writing it (No space left")
    assert "nothing was replaced" in last and "Fix: free space" in last
    assert snapshot(out) == old and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_llama_cpp_failing_on_a_full_disk_is_named_as_such(monkeypatch, tmp_path):
    """llama.cpp says "basic_ios::clear: iostream error" when its output fills the disk (seen in a smoke run):
    with less room than the source takes, that is named DiskFullError; with room, the error stays llama.cpp's."""
    from shortened_llm import llamacpp_guard
    from shortened_llm.errors import DiskFullError

    src, dst = tmp_path / "model-f16.gguf", tmp_path / "model-bf16.gguf"
    src.write_bytes(b"\0" * 4096)
    stream_error = RuntimeError("llama.cpp failed while quantising model-f16.gguf to LLAMA_FTYPE_MOSTLY_BF16 (exit code 1): "
                                "llama_model_quantize: failed to quantize: basic_ios::clear: iostream error")
    monkeypatch.setattr(llamacpp_guard, "_run_child", lambda *a: (_ for _ in ()).throw(stream_error))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(llamacpp_guard.shutil, "disk_usage", lambda p: usage._replace(free=1024))
    with pytest.raises(DiskFullError, match=r"MiB free beside it, less than its 0 MiB source.*Fix: free space"):
        llamacpp_guard.quantize_in_child(src, dst, "LLAMA_FTYPE_MOSTLY_BF16", 1)
    monkeypatch.setattr(llamacpp_guard.shutil, "disk_usage", lambda p: usage._replace(free=2**30))
    with pytest.raises(RuntimeError, match="iostream error") as err:
        llamacpp_guard.quantize_in_child(src, dst, "LLAMA_FTYPE_MOSTLY_BF16", 1)
    assert not isinstance(err.value, DiskFullError)


# ---- two writers of one artifact -----------------------------------------------------------------

TWO_NOTEBOOKS = r"""
import sys, time
from pathlib import Path
from shortened_llm import pipeline

model, run, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
real, computed = pipeline._prune_dense, []
pipeline._prune_dense = lambda *a, **k: (computed.append(1), real(*a, **k))[1]
while not go.exists():  # both start together: the parent creates it once both are ready
    time.sleep(0.02)
pruned, _ = pipeline.pruned_model(model, run, ratio=0.34, preset="tiny", criterion="ppl")
print("pruned" if computed else "loaded", pruned.pruning.removed_blocks)
"""


def test_two_notebooks_on_one_run_dir_prune_once_and_share_it(tmp_path, tiny_llama_dir):
    """Two processes ask pipeline.pruned_model for the same dir at once: one prunes, the other waits and loads."""
    run, go = tmp_path / "run", tmp_path / "go"
    env = {**os.environ, "SHORTENED_LLM_DTYPE": "float32", "OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, "-c", TWO_NOTEBOOKS, str(tiny_llama_dir), str(run), str(go)],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    results = [child.communicate(timeout=240) for child in children]
    assert all(child.returncode == 0 for child in children), [err[-2000:] for _, err in results]
    said = sorted(out.strip().split("\n")[-1] for out, _ in results)
    assert [s.split(" ")[0] for s in said] == ["loaded", "pruned"] and said[0][7:] == said[1][7:]
    pruned = run / "pruned" / "ppl-0.34"
    assert sorted(p.name for p in pruned.parent.iterdir()) == ["ppl-0.34"]  # no temp, no lock left
    assert json.loads((pruned / "pruning.json").read_text())["removed_blocks"] == json.loads(said[0][7:])


@pytest.mark.heavy
def test_two_cli_prunes_to_one_out_dir_never_mix(tmp_path, tiny_llama_dir, uninterrupted):
    """Two ``prune`` runs into the same --out without --overwrite: one writes it, the other is refused; nothing mixed."""
    out = tmp_path / "pruned"
    env = {**os.environ, "SHORTENED_LLM_DTYPE": "float32", "OMP_NUM_THREADS": "1"}
    argv = [a for a in command("prune", tiny_llama_dir, out) if a != "--overwrite"]
    children = [subprocess.Popen([sys.executable, "-m", "shortened_llm", *map(str, argv)], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [child.communicate(timeout=240) for child in children]
    codes = sorted(child.returncode for child in children)
    assert codes == [0, 2], [err[-2000:] for _, err in results]
    loser = next(err for child, (_, err) in zip(children, results) if child.returncode == 2)
    last = loser.strip().split("\n")[-1]
    assert last.startswith("shortened-llm: error: ") and "already exists: pass" in last and "--overwrite" in last
    assert snapshot(out) == uninterrupted("prune") and [p.name for p in tmp_path.iterdir()] == ["pruned"]


# ---- training: killed, then resumed from its last checkpoint ---------------------------------------

# 6 steps, a checkpoint every 2: a kill after step 2 or 4 has a checkpoint to resume from
TRAINING = {"preset": "tiny", "max_steps": 6, "retrain_save_steps": 2, "progress": False}
TRAIN_CHILD = r"""
import json, sys
from transformers import Trainer
from shortened_llm.artifacts import fault_point
from shortened_llm.recovery import get_recovery

# the point `save`: killed inside the Trainer's checkpoint write, weights / optimizer / RNG written,
# trainer_state.json not yet (the Trainer writes in place: this is the half-saved checkpoint)
save_rng_state = Trainer._save_rng_state
Trainer._save_rng_state = lambda self, folder: (save_rng_state(self, folder), fault_point("save"))[0]
method, model, out, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
get_recovery(method)(model, out_dir=out, **options)
"""
# (method, fault point, the checkpoint step the rerun must resume from)
TRAIN_KILLS = [
    ("lora", "checkpoint:1", 2),  # right after checkpoint-2 was saved
    ("lora", "step:4", 2),  # mid-step 4: its gradients computed, not applied; checkpoint-2 is the last
    ("lora", "save:2", 2),  # checkpoint-4 half-saved: the rerun must drop it and go back to checkpoint-2
    ("partial", "checkpoint:2", 4),  # another method (full weights of the last blocks): after checkpoint-4
]
TRAIN_FAST: set = set()  # each takes 35-60 s on a loaded 2-core CPU (a child process, then the rerun): all heavy


def start_step_watch():
    """A callback noting the step training starts at (0, or the resumed checkpoint's) and the first step it runs."""
    from transformers import TrainerCallback

    class StepWatch(TrainerCallback):
        seen: dict = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.seen["start"] = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.setdefault("first", state.global_step)

    return StepWatch()


def trained_outputs(out):
    """A finished training dir as bytes, less what differs between any two runs: what was measured.

    ``loss_log.csv`` keeps the per-step columns (loss, lr, grad norm, eval loss); its timing columns
    and the summary's ``train_loss`` (the mean over the steps *this process* ran) are left out, as are
    ``training.json``'s seconds and peak memory. ``training_args.bin`` (the Trainer's pickle of its
    arguments, in full-weight outputs) is left out too: a resumed run's says ``eval_on_start=False``,
    as it does not measure again the validation loss before step 1 that its checkpoint's log holds.
    """
    import pandas as pd

    files = snapshot(out)
    files.pop("training_args.bin", None)
    log = pd.read_csv(out / "loss_log.csv")[["step", "epoch", "loss", "learning_rate", "grad_norm", "eval_loss"]]
    files["loss_log.csv"] = log.to_csv(index=False, float_format="%r").encode()
    info = json.loads(files.pop("training.json"))
    info = {k: v for k, v in info.items() if k != "seconds" and not k.startswith("memory_")}
    files["training.json"] = json.dumps(info, sort_keys=True).encode()
    return files, log


def train(method, model, out, callbacks=()):
    from shortened_llm.recovery import get_recovery

    return get_recovery(method)(model, out_dir=out, callbacks=callbacks, **TRAINING)


@pytest.fixture(scope="module")
def trained_uninterrupted(tmp_path_factory, tiny_llama_dir):
    """Each method's training run from start to end, once per method."""
    done = {}

    def get(method):
        if method not in done:
            out = tmp_path_factory.mktemp("ref") / method
            train(method, tiny_llama_dir, out)
            done[method] = trained_outputs(out)
        return done[method]
    return get


@pytest.mark.parametrize("method, point, resumed_at",
                         [pytest.param(*k, marks=() if k[:2] in TRAIN_FAST else pytest.mark.heavy) for k in TRAIN_KILLS],
                         ids=[f"{m}-{p}" for m, p, _ in TRAIN_KILLS])
def test_training_killed_then_run_again_resumes_and_ends_as_if_never_killed(
        tmp_path, tiny_llama_dir, trained_uninterrupted, method, point, resumed_at):
    out = tmp_path / method
    env = {**os.environ, FAULT_ENV: point, "SHORTENED_LLM_DTYPE": "float32", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", TRAIN_CHILD, method, str(tiny_llama_dir), str(out), json.dumps(TRAINING)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert child.returncode == -9, child.stderr[-2000:]
    assert not out.exists()  # nothing at the artifact's path until training finished
    work = tmp_path / f"{method}.checkpoints"
    watch = start_step_watch()
    result = train(method, tiny_llama_dir, out, callbacks=[watch])
    assert watch.seen == {"start": resumed_at, "first": resumed_at + 1}  # from the checkpoint, not from step 0
    assert result.steps == TRAINING["max_steps"]
    files, log = trained_outputs(out)
    reference, reference_log = trained_uninterrupted(method)
    assert log.loss.dropna().iloc[-1] == reference_log.loss.dropna().iloc[-1]  # the same final loss, bitwise
    assert files == reference  # weights, adapter, per-step log and record: bitwise an uninterrupted run's
    assert not work.exists() and [p.name for p in tmp_path.iterdir()] == [out.name]  # checkpoints and temps gone
