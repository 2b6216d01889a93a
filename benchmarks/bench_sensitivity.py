"""PPL sensitivity sweep: prefix reuse vs the naive sweep, side by side in one run.

    python benchmarks/bench_sensitivity.py                       # embedded model, 10 x 128 calibration
    python benchmarks/bench_sensitivity.py --samples 4 --seq-len 64 --repeats 2
    python benchmarks/bench_sensitivity.py --arch llama-1-7b --device cuda   # 7B shape, random fp16 weights

``--arch`` builds one of ``shortened_llm.architectures``' shapes with random weights (no
download, no tokenizer): the scores mean nothing but the two sweeps do the same arithmetic as
on the real model, which is what the ratio measures. Calibration is then random token ids.

Naive: for each block i, one batched forward pass of the model without block i (all
calibration samples in one batch). Fast (``reuse_prefix=True``): one pass of the base model
caches the hidden state entering every block, then for each i only the blocks after i run.
Both compute the loss the same way (the model's own logits, then ``shifted_nll``).

The machine is shared, so the two are interleaved at the finest grain that is still honest:
for every block, the naive removal and the fast removal are timed back to back (their order
alternating), and the fast sweep's one caching pass is timed beside a naive removal too.
Load spikes then hit both sides alike. The ratio is total naive time / total fast time; with
``--repeats > 1`` each total is the sum over repeats of the per-block minimum.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from shortened_llm import calibration_batches, load_model
from shortened_llm.architectures import architecture_names, architecture_only_model
from shortened_llm.importance import _block_inputs, _nll_without
from shortened_llm.models import get_blocks


def _timed(fn, device: torch.device):
    """Wall time of ``fn``; on CUDA after the queued kernels finished (the caching pass returns
    tensors without a host sync, so without this its kernels would be billed to the next call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def _model_and_calibration(args):
    if args.arch:
        model = architecture_only_model(args.arch, dtype=args.dtype or "float16", device=args.device)
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len), generator=g)
        return model, ids
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    return model, calibration_batches(tok, n_samples=args.samples, seq_len=args.seq_len, seed=1234)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=10, help="calibration samples (paper: 10)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample (paper: 128)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; per-block minimum is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--arch", default=None, choices=architecture_names(),
                        help="random-weight model of this shape instead of --model")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: --arch picks CUDA when present)")
    parser.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: float16 for --arch)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, ids = _model_and_calibration(args)
    device = next(model.parameters()).device
    n = len(get_blocks(model))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpus={os.cpu_count()} threads={torch.get_num_threads()}"
    print(f"model={args.arch or args.model} blocks={n} dtype={next(model.parameters()).dtype} calibration={tuple(ids.shape)} "
          f"device={device} ({where}) load={os.getloadavg()[0]:.1f}")

    with torch.no_grad():
        _nll_without(model, ids, n // 2, None)  # warm-up (allocator, kernels)
        naive = [math.inf] * n
        fast = [math.inf] * n
        cache_t = math.inf
        nll_naive, nll_fast = [0.0] * n, [0.0] * n
        for r in range(args.repeats):
            cached, t = _timed(lambda: _block_inputs(model, ids), device)
            cache_t = min(cache_t, t)
            for i in range(n):
                pair = [("naive", None), ("fast", cached)]
                for name, inputs in (pair if (i + r) % 2 == 0 else pair[::-1]):
                    nll, t = _timed(lambda: _nll_without(model, ids, i, inputs).double().sum().item(), device)
                    if name == "naive":
                        naive[i], nll_naive[i] = min(naive[i], t), nll
                    else:
                        fast[i], nll_fast[i] = min(fast[i], t), nll
            del cached

    count = ids.shape[0] * (ids.shape[1] - 1)
    ppl_naive = torch.tensor([math.exp(v / count) for v in nll_naive])
    ppl_fast = torch.tensor([math.exp(v / count) for v in nll_fast])
    rel = ((ppl_fast - ppl_naive).abs() / ppl_naive).max().item()
    t_naive, t_fast = sum(naive), sum(fast) + cache_t
    print(f"naive sweep : {t_naive:8.2f} s  ({n} forward passes without one block)")
    print(f"fast sweep  : {t_fast:8.2f} s  (1 caching pass {cache_t:.2f} s + {n} suffix passes {sum(fast):.2f} s)")
    goal = "1.8 on a 7B shape on GPU" if device.type == "cuda" else "1.45 on the embedded model on CPU"
    print(f"ratio       : {t_naive / t_fast:8.3f} x  (goal >= {goal})")
    print(f"scores      : max relative difference {rel:.2e} (goal <= 1e-4)")
    per = ", ".join(f"{i}:{a / b:.2f}" for i, (a, b) in enumerate(zip(naive, fast)))
    print(f"per block naive/fast: {per}")


if __name__ == "__main__":
    main()
