"""Dynamic batch loading (Sheared-LLaMA, Xia et al. 2023, Section 2.2 and Algorithm 1).

Training data comes from several *domains* (here: the pack's text sources, ``bookcorpus`` and
``c4``; never a test split). Each batch is drawn from the domains by sampling weights ``w``,
and every ``m`` steps the weights move towards the domains the model is worst at *relative
to a reference*:

    delta_i = max(loss_i - ref_i, 0)        # excess loss of domain i on its held-out part
    alpha   = w * exp(delta)
    w       = alpha / sum(alpha)

A domain whose loss is already at (or below) its reference keeps its share of ``alpha`` and
so loses weight to the others; one above its reference gains weight. The paper's reference
is the loss of an existing model of the target size (or a scaling-law prediction); this
package uses the loss of the *dense* model the run starts from, measured on each domain's
held-out blocks before any pruning: an optimistic target that every pruned model is above,
so the weights follow how much each domain suffered from pruning.

The starting weights are each domain's share of the training blocks (the paper starts from
RedPajama's own mixture). ``DynamicBatchLoader`` owns the domains' packed blocks, the
weights and their history; ``history_csv`` / ``history_json`` is what a run saves beside its model.

Shearing (``shear.py``, its own loop) calls ``sample`` and ``update`` itself. CPT runs on the HF
``Trainer``, which draws its batches from a dataset through a sampler it owns; there the loader
enters as two pieces (``dynamic_batch_loading``): ``DomainMixture``, a map-style dataset whose
row ``i`` is a block drawn by the weights *at the time it is read* (from a generator seeded by
``i``: the same weights give the same row), and ``DynamicBatchLoadingCallback``, which measures
the held-out losses every ``m`` optimizer steps and moves the weights. The Trainer's data loader
reads one batch ahead, so an update first shows in the batch after next.
"""
from __future__ import annotations

from dataclasses import dataclass

import json

import torch
from transformers import TrainerCallback

from .evaluate import token_nll
from .trainer import packed_rows

__all__ = ["DEFAULT_DOMAINS", "WEIGHTS_FILE", "Domain", "update_weights", "DynamicBatchLoader", "DomainMixture",
           "DynamicBatchLoadingCallback", "dynamic_batch_loading"]

WEIGHTS_FILE = "domain_weights.json"  # what a CPT run with dynamic batch loading saves beside its model

# The pack's training text sources (data.DATASETS); WikiText-2 and PTB are evaluation sets and never a domain.
DEFAULT_DOMAINS = ("bookcorpus", "c4")


@dataclass
class Domain:
    """One domain's packed blocks: ``train`` is sampled from, ``held_out`` measures its loss."""

    name: str
    train: torch.Tensor  # (n_train, block_size) token ids
    held_out: torch.Tensor  # (n_held_out, block_size) token ids


def update_weights(weights: torch.Tensor, losses: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Algorithm 1's update: ``w * exp(max(loss - ref, 0))``, normalised. All three are ``(k,)``."""
    excess = (losses.double() - reference.double()).clamp(min=0)  # (k,)
    alpha = weights.double() * torch.exp(excess)
    return alpha / alpha.sum()


def _blocks(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)


def _domain(tokenizer, name: str, source, block_size: int, val_blocks: int) -> Domain:
    """Pack one domain; ``source`` is a dataset name, a list of texts (held-out = their packed tail),
    or ``(train_texts, held_out_texts)``."""
    if isinstance(source, tuple):
        train_texts, held_texts = source
        if not held_texts:
            raise ValueError(f"domain {name!r} has no held-out text: its reference loss and its weight updates "
                             "need some (give (train_texts, held_out_texts) with held-out texts)")
        try:
            train, _ = packed_rows(tokenizer, train_texts, block_size, val_blocks)
            held, more = packed_rows(tokenizer, held_texts, block_size, val_blocks)
        except ValueError as err:
            raise ValueError(f"domain {name!r}: {err}") from None
        return Domain(name, _blocks(train), _blocks(held + more))
    try:
        train, held = packed_rows(tokenizer, source, block_size, val_blocks)
    except ValueError as err:  # too little text for a train block and a held-out block
        raise ValueError(f"domain {name!r} has no held-out text: {err}; give it more text or a smaller "
                         "block size (cpt_block_size)") from None
    return Domain(name, _blocks(train), _blocks(held))


class DynamicBatchLoader:
    """Batches drawn from several domains by weights that follow each domain's excess loss.

    ``sources`` maps a domain name to its text (see ``_domain``); a plain list of dataset names
    uses each name for both. Call ``set_reference`` (or ``measure_reference`` with the dense
    model) before the first ``update``.
    """

    def __init__(self, tokenizer, sources, block_size: int, val_blocks: int, seed: int = 0):
        if not isinstance(sources, dict):
            sources = {name: name for name in sources}
        if len(sources) < 2:
            raise ValueError(f"dynamic batch loading needs at least 2 domains, got {list(sources)}")
        self.domains = [_domain(tokenizer, name, src, block_size, val_blocks) for name, src in sources.items()]
        sizes = torch.tensor([len(d.train) for d in self.domains], dtype=torch.float64)
        self.weights = sizes / sizes.sum()  # (k,) the source mixture, as the paper starts
        self.reference: torch.Tensor | None = None
        self.history: list[dict] = [self._row(0, None)]
        self._gen = torch.Generator().manual_seed(seed)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    def _row(self, step: int, losses) -> dict:
        row = {"step": step, **{f"weight_{n}": float(w) for n, w in zip(self.names, self.weights)}}
        if losses is not None:
            row.update({f"loss_{n}": float(v) for n, v in zip(self.names, losses)})
        return row

    def sample(self, n: int) -> torch.Tensor:
        """``(n, block_size)`` training blocks: a domain per row by the weights, then a random block of it."""
        which = torch.multinomial(self.weights.float(), n, replacement=True, generator=self._gen)
        rows = [self.domains[i].train[torch.randint(len(self.domains[i].train), (1,), generator=self._gen)][0]
                for i in which.tolist()]
        return torch.stack(rows)

    @torch.no_grad()
    def held_out_losses(self, model, micro_batch: int = 4) -> torch.Tensor:
        """``(k,)`` mean next-token loss of ``model`` on each domain's held-out blocks (``evaluate.token_nll``)."""
        return torch.stack([token_nll(model, d.held_out, micro_batch).double().mean() for d in self.domains])

    def set_reference(self, losses) -> None:
        losses = torch.as_tensor(losses, dtype=torch.float64)
        if losses.shape != (len(self.domains),):
            raise ValueError(f"reference losses have shape {tuple(losses.shape)}, need one per domain {self.names}")
        self.reference = losses

    def measure_reference(self, dense_model, micro_batch: int = 4) -> torch.Tensor:
        """The dense model's held-out loss per domain, as the reference (before any pruning)."""
        self.set_reference(self.held_out_losses(dense_model, micro_batch))
        return self.reference

    def update(self, step: int, losses) -> torch.Tensor:
        """Move the weights by Algorithm 1 given this step's held-out ``losses`` (k,); recorded in ``history``."""
        if self.reference is None:
            raise RuntimeError("no reference losses: call measure_reference(dense_model) or set_reference first")
        losses = torch.as_tensor(losses, dtype=torch.float64)
        self.weights = update_weights(self.weights, losses, self.reference)
        self.history.append(self._row(step, losses))
        return self.weights

    def history_csv(self) -> str:
        """The weights (and the losses that moved them) after every update, one row per update."""
        keys = ["step", *(f"weight_{n}" for n in self.names), *(f"loss_{n}" for n in self.names)]
        lines = [",".join(keys)] + [",".join(str(row.get(k, "")) for k in keys) for row in self.history]
        if self.reference is not None:
            lines.append("reference," + ",".join("" for _ in self.names) + ","
                         + ",".join(str(float(r)) for r in self.reference))
        return "\n".join(lines) + "\n"

    def history_json(self, interval: int | None = None) -> str:
        """The same history as JSON: domains, reference losses, and one ``{step, weights, losses}`` per update."""
        rows = [{"step": r["step"], "weights": {n: r[f"weight_{n}"] for n in self.names},
                 "losses": {n: r[f"loss_{n}"] for n in self.names} if f"loss_{self.names[0]}" in r else None}
                for r in self.history]
        reference = None if self.reference is None else dict(zip(self.names, map(float, self.reference)))
        return json.dumps({"domains": self.names, "update_every_steps": interval, "reference": reference,
                           "history": rows}, indent=2) + "\n"


class DomainMixture(torch.utils.data.Dataset):
    """The Trainer's training rows under dynamic batch loading: row ``i`` is a block of a domain drawn by the
    loader's weights when the row is read (the Trainer's sampler picks ``i``; the weights pick the domain).

    A generator seeded by ``(seed, i)`` draws both the domain and the block, so a row depends only on its
    index and the weights of the moment: runs with the same seed draw the same blocks.
    """

    def __init__(self, loader: DynamicBatchLoader, seed: int = 0):
        self.loader, self.seed = loader, seed
        self.length = sum(len(d.train) for d in loader.domains)  # an epoch: as many rows as there are blocks

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        domain = self.loader.domains[int(torch.multinomial(self.loader.weights.float(), 1, generator=gen))]
        block = domain.train[int(torch.randint(len(domain.train), (1,), generator=gen))].tolist()
        return {"input_ids": block, "labels": block}


class DynamicBatchLoadingCallback(TrainerCallback):
    """Every ``interval`` optimizer steps: the model's held-out loss per domain, then Algorithm 1's update."""

    def __init__(self, loader: DynamicBatchLoader, interval: int, micro_batch: int = 4):
        if interval < 1:
            raise ValueError(f"interval={interval} must be >= 1 (cpt_domain_interval in the preset)")
        self.loader, self.interval, self.micro_batch = loader, interval, micro_batch

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.interval:
            return
        training = model.training
        model.eval()
        losses = self.loader.held_out_losses(model, self.micro_batch)
        model.train(training)
        self.loader.update(state.global_step, losses)


def dynamic_batch_loading(tokenizer, reference_model, domains, *, block_size: int, val_blocks: int, interval: int,
                          micro_batch: int = 4, seed: int = 0):
    """``(loader, dataset, callback)`` for a Trainer run: the domains packed, the reference losses measured
    on ``reference_model`` (the dense model) before any training, the dataset and the callback above."""
    loader = DynamicBatchLoader(tokenizer, list(domains), block_size, val_blocks, seed)
    training = reference_model.training
    reference_model.eval()
    loader.measure_reference(reference_model, micro_batch)
    reference_model.train(training)
    return loader, DomainMixture(loader, seed), DynamicBatchLoadingCallback(loader, interval, micro_batch)
