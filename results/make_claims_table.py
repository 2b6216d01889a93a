"""Background run behind ``results/claims_smollm2-135m.csv`` and ``results/ppl_smollm2-135m.csv`` (issue 7).

The paper's claims checked on the embedded SmolLM2-135M with the models a ``cpu``-preset run left in
``--run-dir``: dense, 20 %-pruned (PPL criterion, Taylor+) and every retrained model there
(notebooks 04 and 05: ``lora-0.20``, ``cpt-0.50``, ...). Perplexity: WikiText-2, paper protocol
(128-token segments, BOS once), first 100 segments. Zero-shot: the committed
``zeroshot_smollm2-135m.csv``. Speed: the committed CPU sweep in ``efficiency/``.

    SHORTENED_LLM_DATA=... OMP_NUM_THREADS=1 python results/make_claims_table.py --run-dir runs/cpu

``--from-tables`` judges the claims again from the committed CSVs alone, loading no model: for when
a claim's rule changes (issue 20: "LoRA recovers" now needs a stated share of the lost PPL) and
the measured numbers do not.
"""
import argparse
from pathlib import Path

import pandas as pd
import torch

from shortened_llm.artifacts import atomic_write_text, read_cached_csv
from shortened_llm.lessons.claims import PPL_COLUMNS, ZEROSHOT_COLUMNS, claims_table, ppl_table, run_models

HERE = Path(__file__).parent


class Loaded(dict):
    """Label -> (model, tokenizer), each loaded when ``ppl_table`` first reaches it."""

    def __init__(self, loaders):
        super().__init__(loaders)

    def items(self):
        for label, load in super().items():
            yield label, load()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", default="runs/cpu")
    p.add_argument("--segments", type=int, default=100)
    p.add_argument("--from-tables", action="store_true",
                   help="judge the claims from the committed ppl_smollm2-135m.csv, loading no model")
    args = p.parse_args()
    torch.set_num_threads(1)
    ppl_csv, fix = HERE / "ppl_smollm2-135m.csv", "rerun without --from-tables to measure it again"
    if args.from_tables:
        ppl = read_cached_csv(ppl_csv, PPL_COLUMNS, fix, keep_default_na=False)
        ppl = ppl[ppl.max_segments.astype(str) == str(args.segments)]
    else:
        models = Loaded(run_models(args.run_dir, preset="paper"))
        ppl = ppl_table(models, ppl_csv, max_segments=args.segments, datasets=("wikitext2",), bos_protocols=("once",))
    zeroshot = read_cached_csv(HERE / "zeroshot_smollm2-135m.csv", ZEROSHOT_COLUMNS, "restore the committed file "
                               "(git log results/zeroshot_smollm2-135m.csv)", keep_default_na=False, na_values=[""])
    efficiency = pd.read_csv(HERE / "efficiency" / "cpu_smollm2-135m_smoke.csv")
    claims = claims_table(ppl, zeroshot, efficiency)
    atomic_write_text(HERE / "claims_smollm2-135m.csv", claims.to_csv(index=False))
    print(ppl.to_string(), claims.to_markdown(index=False), sep="\n\n")
