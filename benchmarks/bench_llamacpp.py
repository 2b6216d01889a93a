"""llama.cpp's NLL scoring speed across builds and load settings, measured side by side in one run.

    python benchmarks/bench_llamacpp.py                                  # the installed build
    python benchmarks/bench_llamacpp.py --builds native=/tmp/lc_default no-amx=/tmp/lc_new

What PPL in llama.cpp costs (``llamacpp.gguf_token_nll``: one 128-token segment per call) for
each GGUF type of the embedded model, for each build of llama-cpp-python (a folder holding an
unpacked wheel's ``llama_cpp`` package, put first on a child's PYTHONPATH) and with llama.cpp's
extra buffer types on and off (``llamacpp_guard``'s AMX switch, which also turns off the
repacked q4_0/q4_K layouts). Every measurement runs in its own child process, interleaved
over ``--rounds`` rounds; a child that dies (a SIGILL of an AMX build) is reported, not fatal.
Prints tokens per second (median over rounds) and the ratio to the first configuration of each type, with
the CPU model and each build's system info.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args) -> None:
    """One measurement: load ``args.gguf``, score the segments once to warm up, then time them."""
    import numpy as np
    import torch

    import llama_cpp
    from shortened_llm import llamacpp_guard
    from shortened_llm.llamacpp import gguf_token_nll

    ids = torch.from_numpy(np.load(args.ids))
    kwargs = dict(n_ctx=ids.shape[1], n_batch=ids.shape[1], logits_all=True, n_threads=args.threads,
                  n_threads_batch=args.threads, verbose=False)
    if args.extra_buffers == "off":
        with llamacpp_guard._extra_buffers_off(llama_cpp):
            llm = llama_cpp.Llama(model_path=args.gguf, **kwargs)
    else:
        llm = llama_cpp.Llama(model_path=args.gguf, **kwargs)
    gguf_token_nll(llm, ids[:1])
    start = time.perf_counter()
    nll = gguf_token_nll(llm, ids)
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": ids.numel() / seconds, "nll": nll.double().mean().item(),
                      "llama_cpp": str(Path(llama_cpp.__file__).parent),
                      "system_info": llama_cpp.llama_print_system_info().decode().strip()}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--builds", nargs="*", default=[], metavar="NAME=DIR",
                   help="unpacked llama-cpp-python wheels to compare (default: the installed one)")
    p.add_argument("--quants", nargs="*", default=["q8_0", "q4_k_m"])
    p.add_argument("--extra-buffers", nargs="*", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default=None, help="where the GGUF files go (default: a temp dir)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import numpy as np

    from shortened_llm.evaluate import ppl_segments
    from shortened_llm.export import export_gguf
    from shortened_llm.llamacpp import quantize_gguf
    from shortened_llm.llamacpp_guard import cpu_model
    from shortened_llm.models import load_model

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    _, tokenizer = load_model(args.model)
    ids = ppl_segments(tokenizer, "wikitext2", args.seq_len, "once", args.segments)
    np.save(work / "ids.npy", ids.numpy())
    f16 = work / "model-f16.gguf"
    if not f16.exists():
        export_gguf(args.model, f16, "f16", progress=False)
    files = {}
    for quant in args.quants:
        files[quant] = work / f"model-{quant}.gguf"
        if not files[quant].exists():
            quantize_gguf(f16, files[quant], quant)

    builds = dict(b.split("=", 1) for b in args.builds) or {"installed": ""}
    configs = [(b, q, e) for b in builds for q in args.quants for e in args.extra_buffers]
    results = {c: [] for c in configs}
    info = {}
    for _ in range(args.rounds):
        for build, quant, extra in configs:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [builds[build], os.environ.get("PYTHONPATH")]))}
            cmd = [sys.executable, __file__, "--child", "--gguf", str(files[quant]), "--ids", str(work / "ids.npy"),
                   "--threads", str(args.threads), "--extra-buffers", extra]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                results[build, quant, extra].append({"error": f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}"})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            info[build] = (row["llama_cpp"], row["system_info"])
            results[build, quant, extra].append(row)

    print(f"CPU: {cpu_model()}; {args.threads} thread(s); {args.segments} segments x {args.seq_len} tokens; "
          f"{args.rounds} interleaved rounds, one child process per measurement")
    for build, (where, system) in info.items():
        print(f"build {build}: {where}\n  {system}")
    print(f"\n{'build':<15} {'type':<8} {'extra bufs':<10} {'tokens/s':>9} {'ratio':>6} {'NLL':>8}")
    base = {}  # the first configuration of each type
    for config in sorted(configs, key=lambda c: args.quants.index(c[1])):
        rows = results[config]
        ok = [r for r in rows if "error" not in r]
        if not ok:
            print(f"{config[0]:<15} {config[1]:<8} {config[2]:<10} died: {rows[0]['error']}")
            continue
        speed = statistics.median(r["tokens_per_s"] for r in ok)
        base.setdefault(config[1], speed)
        print(f"{config[0]:<15} {config[1]:<8} {config[2]:<10} {speed:9.1f} {speed / base[config[1]]:6.2f} {ok[0]['nll']:8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
