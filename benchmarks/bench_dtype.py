"""fp32 vs ``dtype="auto"`` side by side on this machine (issue 20, "Fast by default").

    python benchmarks/bench_dtype.py --threads 1
    python benchmarks/bench_dtype.py --threads 2 --repeats 5

One process, both models loaded, every measurement interleaved (fp32, auto, fp32, auto, ...)
so that a neighbour's load falls on both alike. Times (median of ``--repeats``, with min-max):

- forward on 8 x 128 WikiText-2 tokens (no gradients);
- a LoRA step (r=8, all seven projections, 8 x 128 tokens, AdamW) and a full-parameter (CPT)
  step, in the precision ``lora_retrain`` / ``continued_pretrain`` train in (``trainer.master_weights``):
  on a bf16 model the weights the optimizer updates are fp32 and the forward runs under bf16
  autocast, a LoRA base stays bf16; on an fp32 model everything is fp32. Before 2026-12-02 the
  package trained a bf16 model all in fp32, so the fp32 column is also what it did then;
- the PPL-criterion sweep at ``smoke`` (4 x 128 calibration, 30 removals): "package" scores in
  fp32 whatever the model's dtype (``block_importance``), "in bf16" with ``fp32=False``;
- zero-shot accuracy on ``--docs`` documents of one task, and WikiText-2 PPL on 40 segments.

Then what the speed costs: PPL of both, zero-shot of both, and the PPL criterion's removal
order (first 6 blocks, Spearman over all blocks) against fp32. Ratios are fp32 time / auto time.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _spearman(a, b) -> float:
    import torch

    ra, rb = (torch.as_tensor(x, dtype=torch.float64).argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _lora_model(base):
    from peft import LoraConfig, get_peft_model

    from shortened_llm.presets import get_preset

    p = get_preset("smoke")
    config = LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                        target_modules=list(p.lora_targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(copy.deepcopy(base), config).train()


def _trainer_step(model, ids):
    """One forward + backward + AdamW step on ``ids`` (B, T), in the package's training precision
    (``trainer.master_weights``: fp32 weights to update, bf16 autocast on a bf16 model); returns a callable."""
    import torch

    from shortened_llm.trainer import master_weights

    _, bf16_autocast = master_weights(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the forward and the training steps")
    parser.add_argument("--task", default="piqa", help="zero-shot task")
    parser.add_argument("--docs", type=int, default=20, help="zero-shot documents")
    parser.add_argument("--ppl-segments", type=int, default=40)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from shortened_llm import calibration_batches, load_model
    from shortened_llm.evaluate import perplexity, ppl_segments
    from shortened_llm.importance import block_importance, blocks_to_remove
    from shortened_llm.llamacpp_guard import cpu_model
    from shortened_llm.precision import choose_dtype
    from shortened_llm.presets import get_preset
    from shortened_llm.prune import num_blocks_for_ratio
    from shortened_llm.zeroshot import zero_shot

    choice = choose_dtype("auto", device="cpu", announce=False)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"AMX {torch.cpu._is_amx_tile_supported()}, AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"dtype chosen by auto: {choice.name} ({choice.reason})")
    models = {"fp32": load_model(args.model, dtype="float32", device="cpu")[0]}
    models["auto"], tok = load_model(args.model, dtype="auto", device="cpu")
    half = models["auto"].dtype != torch.float32  # extra variants only where auto is not fp32 already

    ids = ppl_segments(tok, "wikitext2", 128, "once", max_segments=8)  # (8, 128)
    smoke = get_preset("smoke")
    calib = calibration_batches(tok, smoke.calib_samples, smoke.calib_seq_len, smoke.seed)  # (4, 128)

    # what is timed: name -> {variant: callable}
    def forward(m):
        with torch.no_grad():
            m(ids, use_cache=False)

    jobs: dict[str, dict] = {"forward 8x128": {name: lambda m=m: forward(m) for name, m in models.items()}}
    lora = {name: _lora_model(m) for name, m in models.items()}
    jobs["LoRA step (package)"] = {name: _trainer_step(m, ids) for name, m in lora.items()}
    cpt = {name: copy.deepcopy(m).train().requires_grad_(True) for name, m in models.items()}
    jobs["CPT step (package)"] = {name: _trainer_step(m, ids) for name, m in cpt.items()}
    if half:
        adapter = next(p for n, p in lora["auto"].named_parameters() if "lora_A" in n)
        base = next(p for n, p in lora["auto"].named_parameters() if not p.requires_grad)
        print(f"LoRA on the auto model trains adapters in {adapter.dtype} over a {base.dtype} base, under bf16 autocast")

    times: dict[str, dict[str, list[float]]] = {job: {"fp32": [], "auto": []} for job in jobs}
    for job in jobs.values():  # warm-up: oneDNN picks and caches its kernels on first use
        for fn in job.values():
            fn()
    for _ in range(args.repeats):
        for job, variants in jobs.items():
            for name, fn in variants.items():
                times[job][name].append(_timed(fn))
    del lora, cpt, jobs

    # once each, still interleaved: the sweep, zero-shot, PPL
    once: dict[str, dict[str, float]] = {}  # job -> variant -> seconds
    results: dict[str, dict] = {}  # job -> variant -> what it computed

    def run_once(job, name, fn):
        t0 = time.perf_counter()
        results.setdefault(job, {})[name] = fn()
        once.setdefault(job, {})[name] = time.perf_counter() - t0

    sweep, zs, wt2 = "PPL sweep, smoke", f"zero-shot {args.task} x{args.docs}", f"WikiText-2 PPL x{args.ppl_segments}"
    sweeps = {"fp32": (models["fp32"], True), "auto": (models["auto"], True)}
    if half:
        sweeps["auto, scored in bf16"] = (models["auto"], False)
    for name, (m, fp32) in sweeps.items():
        run_once(sweep, name, lambda: block_importance(m, calib, "ppl", fp32=fp32, progress=False))
    for name, m in models.items():
        run_once(zs, name, lambda: float(zero_shot(m, tok, tasks=[args.task], limit=args.docs, average=False,
                                                   progress=False).value[0]))
    for name, m in models.items():
        run_once(wt2, name, lambda: perplexity(m, tok, "wikitext2", max_segments=args.ppl_segments, progress=False))
    scores, accuracy, ppl = results[sweep], results[zs], results[wt2]

    print(f"\n{'seconds':<34}{'fp32':>22}{'auto (' + choice.name + ')':>24}{'ratio':>8}")
    for job, t in times.items():
        cells = [f"{statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]" for v in (t["fp32"], t["auto"])]
        print(f"{job:<34}{cells[0]:>22}{cells[1]:>24}{statistics.median(t['fp32']) / statistics.median(t['auto']):>7.2f}x")
    for job, t in once.items():
        for name in t:
            if name == "fp32":
                continue
            label = job if name == "auto" else f"{job} ({name.split(', ')[1]})"
            print(f"{label:<34}{t['fp32']:>22.2f}{t[name]:>24.2f}{t['fp32'] / t[name]:>7.2f}x")

    n = num_blocks_for_ratio(len(scores["fp32"]), smoke.ratio)
    print(f"\nWikiText-2 PPL ({args.ppl_segments} x 128): fp32 {ppl['fp32']:.3f}, auto {ppl['auto']:.3f} "
          f"({100 * (ppl['auto'] / ppl['fp32'] - 1):+.2f} %)")
    print(f"zero-shot {args.task} accuracy ({args.docs} documents): fp32 {accuracy['fp32']:.3f}, auto {accuracy['auto']:.3f}")
    first = blocks_to_remove(scores["fp32"], n)
    print(f"PPL criterion at smoke, the {n} blocks removed: fp32 {first}")
    for name, s in scores.items():
        if name == "fp32":
            continue
        rel = float(((s - scores["fp32"]).abs() / scores["fp32"]).max())
        print(f"  {name}: {blocks_to_remove(s, n)} (same: {blocks_to_remove(s, n) == first}); "
              f"Spearman over {len(s)} blocks {_spearman(s, scores['fp32']):.4f}; largest score change {100 * rel:.2f} %")


if __name__ == "__main__":
    main()
