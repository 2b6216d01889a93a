"""Background run behind ``results/zeroshot_smollm2-135m.csv`` (issue 7).

Dense SmolLM2-135M and its two 20%-pruned versions (PPL criterion; Taylor+), pruned with
10 x 128-token calibration samples, seed 1234, evaluated zero-shot with lm-eval on the
offline pack. Resumable: rows already in the CSV are kept.

    SHORTENED_LLM_DATA=... nice -n 10 python results/make_zeroshot_table.py --limit 50
"""
import argparse
from pathlib import Path

import torch

from shortened_llm import load_model
from shortened_llm.retrain import pruned_model
from shortened_llm.zeroshot import zero_shot_table

# cheap tasks first: a run cut short still compares all models on what it finished
ORDER = ("winogrande", "arc_easy", "piqa", "openbookqa", "arc_challenge", "hellaswag", "boolq")


def pruned(criterion, run_dir):
    """Loads the 20 %-pruned model from ``run_dir`` (pruning and saving it there first if missing)."""
    return lambda: pruned_model("smollm2-135m", run_dir, 0.2, preset="paper", criterion=criterion)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--run-dir", default="runs/cpu")
    p.add_argument("--out", default=str(Path(__file__).with_name("zeroshot_smollm2-135m.csv")))
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)  # a shared machine: leave the other cores to others
    models = {
        "dense": lambda: load_model("smollm2-135m", device="cpu"),
        "ppl-0.20": pruned("ppl", args.run_dir),
        "taylor+-0.20": pruned("taylor+", args.run_dir),
    }
    table = zero_shot_table(models, args.out, tasks=ORDER, limit=args.limit, batch_size=args.batch_size)
    print(table.to_string())
