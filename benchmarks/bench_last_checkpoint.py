"""A full-weight run with and without the checkpoint the Trainer saves after the last step, side by side.

    python benchmarks/bench_last_checkpoint.py                 # CPT at preset tiny, embedded model, 2 rounds
    python benchmarks/bench_last_checkpoint.py --steps 15 --preset smoke

``keep_checkpoints=True`` keeps that checkpoint (what every run did before 2026-12-02); the default
skips it (``trainer._no_checkpoint_after_the_last_step``). Both runs train the same weights; the
script checks that, then prints each run's seconds, the ratio, and the size of the checkpoint skipped.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from shortened_llm.models import load_model
from shortened_llm.retrain import checkpoints_dir, continued_pretrain

from rounds import alternating


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_last_checkpoint_"))
    first, size = None, None
    try:
        def train(label: str, r: int) -> None:
            nonlocal first, size
            model, tok = load_model(args.model)
            out = work / f"{label}-{r}"
            result = continued_pretrain(model, tok, out, preset=args.preset, max_steps=args.steps, progress=False,
                                        keep_checkpoints=label == "with")
            if label == "with":
                last = checkpoints_dir(out) / f"checkpoint-{args.steps}"
                size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file()) / 2**20
            weights = {n: w.detach().clone() for n, w in result.model.named_parameters()}
            first = first or weights  # every run trains the same weights as the first one
            for n, w in weights.items():
                torch.testing.assert_close(w, first[n], msg=n)

        best = alternating(("with", "without"), args.rounds, train)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from shortened_llm.llamacpp_guard import cpu_model

    print(f"{args.model}, CPT at preset {args.preset}, {args.steps} steps, {torch.get_num_threads()} thread(s), {cpu_model()}")
    print(f"with the last checkpoint ({size:.0f} MiB): {best['with']:.1f} s; without: {best['without']:.1f} s "
          f"(best of {args.rounds}); {best['with'] / best['without']:.2f}x; same weights: yes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
