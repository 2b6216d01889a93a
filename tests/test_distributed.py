"""CPT under torchrun with 2 CPU processes (gloo) logs the same losses as 1 process at the same global batch."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from conftest import make_tiny_llama


def _losses(out) -> list[float]:
    with open(out / "loss_log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


@pytest.mark.heavy  # two torchrun processes training a model: minutes on a 2-core CPU
@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")
def test_two_processes_match_one(tmp_path):
    from transformers import AutoTokenizer

    from shortened_llm.models import _embedded_checkpoint, save_model

    tok = AutoTokenizer.from_pretrained(_embedded_checkpoint("smollm2-135m"))
    save_model(make_tiny_llama(vocab_size=len(tok)), tok, tmp_path / "base")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # tiny preset: global batch 4 = micro-batch 2 x 2 accumulation (1 process) = 2 x 2 processes
    cli = ["-m", "shortened_llm", "retrain", "cpt", "--model", str(tmp_path / "base"), "--preset", "tiny", "--max-steps", "3"]
    one = subprocess.run([sys.executable, *cli, "--out", str(tmp_path / "p1")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    # --standalone: a private rendezvous on a free port, so parallel CI jobs cannot collide
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *cli, "--out", str(tmp_path / "p2")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    l1, l2 = _losses(tmp_path / "p1"), _losses(tmp_path / "p2")
    assert len(l1) == len(l2) == 3
    # same data, same gradients (DDP averages them): only float summation order differs
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-5)
    assert l1[-1] < l1[0]
