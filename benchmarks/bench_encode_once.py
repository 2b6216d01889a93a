"""Corpora encoded once per tokenizer content (``data.encoded_once``) against once per model, side by side.

    python benchmarks/bench_encode_once.py             # embedded model, 4 copies, 2 rounds

What notebook 06 does for every model it evaluates, and every training run does for its corpus: each
model dir is loaded with its own tokenizer object, and before 2026-12-02 each object encoded
WikiText-2 and PTB (``evaluate._token_stream``) and C4 (``trainer.pack_blocks``) again. Here
``--copies`` tokenizers are loaded from saved copies of one model; each asks for the PPL segments of
both datasets and C4's packed blocks, once with the cache as it is ("once") and once with it cleared
before every copy ("per model", what the old identity-keyed cache did for new objects). The script
checks that both give the same ids, then prints the seconds and the ratio.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from shortened_llm.evaluate import PPL_DATASETS, _token_stream, ppl_segments
from shortened_llm.llamacpp_guard import cpu_model
from shortened_llm.models import load_model
from shortened_llm.trainer import _text_stream, pack_blocks
from shortened_llm.data import load_texts

from rounds import alternating


def encode_all(tokenizer) -> list[torch.Tensor]:
    """What one evaluated and trained model asks for: both PPL datasets and the CPT corpus in blocks."""
    return [*(ppl_segments(tokenizer, d, seq_len=128) for d in PPL_DATASETS), pack_blocks(tokenizer, load_texts("c4"), 128)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_encode_once_"))
    try:
        tokenizer = load_model(args.model)[1]
        for i in range(args.copies):
            tokenizer.save_pretrained(work / f"copy-{i}")
        outputs = {}

        def encode_copies(label: str, _round: int) -> None:
            _token_stream.cache_clear(), _text_stream.cache_clear()
            for i in range(args.copies):
                if label == "per model":
                    _token_stream.cache_clear(), _text_stream.cache_clear()
                outputs[label] = encode_all(AutoTokenizer.from_pretrained(work / f"copy-{i}"))

        best = alternating(("once", "per model"), args.rounds, encode_copies)
        for a, b in zip(outputs["once"], outputs["per model"]):
            assert torch.equal(a, b), "the cache changed the ids"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.model}, {args.copies} tokenizer copies x (WikiText-2 + PTB + C4), {torch.get_num_threads()} thread(s), "
          f"{cpu_model()}")
    print(f"encoded once: {best['once']:.1f} s; once per model: {best['per model']:.1f} s (best of {args.rounds}); "
          f"{best['per model'] / best['once']:.1f}x; same ids: yes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
