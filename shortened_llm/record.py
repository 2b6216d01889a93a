"""``pruning.json``: which original blocks a pruned model keeps, and how they were chosen.

Ground floor: ``models`` reads and writes it with a model, ``prune`` fills it in. Imports
nothing of the package.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = ["PruningRecord"]


@dataclass
class PruningRecord:
    """What ``pruning.json`` holds: enough to map every kept block back to the original."""

    original_num_blocks: int
    removed_blocks: list[int] = field(default_factory=list)  # original indices, sorted
    criterion: str | None = None
    ratio: float | None = None
    scores: list[float] | None = None  # one per original block, higher = more important
    method: str = "depth"
    # a training-free recovery folded into the weights (ReplaceMe: objective, calibration, fits);
    # written to pruning.json only when there is one, so plain pruned dirs read as before
    recovery: dict | None = None
    # {"dtype", "reason"}: what load_model chose for the model when this record was first saved (block
    # scoring itself runs in fp32); written only when known, so records of plain HF objects read as before
    precision: dict | None = None

    @property
    def kept_blocks(self) -> list[int]:
        removed = set(self.removed_blocks)
        return [i for i in range(self.original_num_blocks) if i not in removed]

    def attach(self, model, criterion: str | None = None, ratio: float | None = None, scores=None):
        """The last step of every removal (``remove_blocks``, ``remove_sublayers``): note how it was chosen,
        hang the record on ``model`` as ``model.pruning`` (what ``save_model`` writes) and return the model."""
        self._note_choice(criterion, ratio, scores)
        model.pruning = self
        return model

    def _note_choice(self, criterion, ratio, scores) -> None:
        if criterion is not None:
            self.criterion = criterion
        if ratio is not None:
            self.ratio = ratio
        if scores is not None:
            self.scores = [float(s) for s in scores]

    def seal_dir(self, path) -> None:
        """Make a saved dir safe from plain ``from_pretrained``; a plain pruned dir loads as it is.

        ``save_model`` calls this for every record; kinds that plain transformers would load
        wrongly (``subblock.SubBlockRecord``: rebuilt halves with random weights) override it.
        """

    def to_json(self) -> str:
        data = asdict(self)
        for optional in ("recovery", "precision"):
            if data[optional] is None:
                del data[optional]
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "PruningRecord":
        data = json.loads(text)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)
