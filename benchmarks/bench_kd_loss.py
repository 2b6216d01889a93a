"""The KD loss's two paths side by side in one run: fused (``distill._FusedKL``) vs checkpointed.

    python benchmarks/bench_kd_loss.py                 # embedded model, 6 of 30 blocks removed, 4 x 128 tokens
    python benchmarks/bench_kd_loss.py --rounds 5 --tokens 2 256

Both paths compute the same vocabulary-wide KL(teacher || student) from the final hidden
states; the checkpointed one recomputes each chunk's logits (and the teacher's) in backward, the
fused one makes the chunk's gradients in the forward. Timed per micro-batch, rounds
interleaved so both see the same machine: the loss alone (forward + backward of ``kd_loss``)
and a whole KD micro-step (student forward and backward, teacher forward, the loss), under
the autocast training uses where models load in bf16. Prints seconds, the ratio and both losses.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from shortened_llm.distill import kd_loss
from shortened_llm.llamacpp_guard import cpu_model
from shortened_llm.models import load_model
from shortened_llm.precision import choose_dtype
from shortened_llm.prune import remove_blocks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, nargs=2, default=(4, 128), metavar=("BATCH", "SEQ"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    teacher, _ = load_model(args.model)
    student, _ = load_model(args.model)
    remove_blocks(student, [4, 13, 14, 16, 17, 18])  # notebook 09's 20 % PPL-criterion model
    student.float().train()  # fp32 master weights, as the trainer keeps them
    dtype = choose_dtype().dtype  # what models load in here: bf16 autocast for training where it is bf16
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16)
    batch, seq = args.tokens
    ids = torch.randint(0, student.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[:, -1] = False
    head_s, head_t = student.get_output_embeddings(), teacher.get_output_embeddings()
    heads = {"checkpointed": torch.nn.Sequential(head_s), "fused": head_s}  # a wrapped head takes the old path

    def hidden(model, grad):
        with torch.set_grad_enabled(grad):
            return model(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states[-1]

    with autocast:
        h_t = hidden(teacher, False)
        h_s = hidden(student, False).detach()

        def loss_only(head):
            h = h_s.clone().requires_grad_(True)
            loss = kd_loss(h, h_t, head, head_t, valid, student.config)
            loss.backward()
            return loss.item()

        def micro_step(head):
            loss = kd_loss(hidden(student, True), hidden(teacher, False), head, head_t, valid, student.config)
            loss.backward()
            return loss.item()

        times = {(part, path): [] for part in ("loss", "step") for path in heads}
        losses = {}
        for part, fn in (("loss", loss_only), ("step", micro_step)):
            for path, head in heads.items():
                fn(head)  # warm-up
            for _ in range(args.rounds):
                for path, head in heads.items():
                    student.zero_grad(set_to_none=True)
                    start = time.perf_counter()
                    losses[(part, path)] = fn(head)
                    times[(part, path)].append(time.perf_counter() - start)

    print(f"{args.model}, 24 of 30 blocks, {batch} x {seq} tokens, {dtype} ({'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}), "
          f"{torch.get_num_threads()} thread(s), {cpu_model()}; median of {args.rounds} interleaved rounds")
    for part, what in (("loss", "kd_loss forward + backward"), ("step", "KD micro-step (student fwd+bwd, teacher, loss)")):
        old, new = (statistics.median(times[(part, p)]) for p in ("checkpointed", "fused"))
        print(f"  {what}: checkpointed {old:.2f} s, fused {new:.2f} s, {old / new:.2f}x; "
              f"loss {losses[(part, 'checkpointed')]:.6f} vs {losses[(part, 'fused')]:.6f}")


if __name__ == "__main__":
    main()
