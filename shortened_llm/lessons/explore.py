"""The notebooks' explorers: scores and pruned-model perplexities for notebooks 01-02, computed
once and kept in ``run_dir``, and notebook 07's depth-vs-width widgets.

A classroom re-run, or a widget moved back to a value it already showed, must answer at
once: scores are train-or-load (``run_dir/scores/<criterion>.csv``) and every
(criterion, blocks removed) perplexity is remembered in memory and in
``run_dir/explore/<dataset>_ppl.json``. Pruned models are evaluated with
``prune.skipping_blocks`` (no copy of the weights), so exploring costs no memory.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..artifacts import atomic_write_text, load_scores, save_scores, scores_csv
from ..evaluate import default_bos, ppl_segments, token_nll
from ..importance import DATA_FREE, block_importance, blocks_to_remove, check_removable, criterion_options, split_criterion
from ..models import get_blocks
from ..pipeline import plus_rule
from ..prune import skipping_blocks

__all__ = ["scores_for", "rank_correlation", "max_removable", "PruneExplorer", "explorer_widget", "scores_widget",
           "generation_widget", "ratio_widget"]


def scores_for(model, calib: torch.Tensor | None, criterion: str, run_dir: str | os.PathLike | None = None,
               n: int | None = None, progress: bool = True) -> torch.Tensor:
    """Train-or-load the scores of ``criterion`` (its base name: ``taylor+`` shares ``taylor``'s).

    ``n`` (blocks to remove) only matters for ``sleb`` and ``angular``; a stored file wins, so
    compute those with the largest ``n`` you will need (``sleb``'s first k removals are the
    same for every n >= k).
    """
    base, _ = split_criterion(criterion)
    path = scores_csv(run_dir, base) if run_dir is not None else None
    if path is not None and path.exists():
        return load_scores(path)
    options = criterion_options(base, n)
    if base not in DATA_FREE:
        options["progress"] = progress
    scores = block_importance(model, calib, base, **options)
    if path is not None:
        save_scores(path, scores)
    return scores


def rank_correlation(scores: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Spearman rank correlation between criteria (criterion x criterion)."""
    table = pd.DataFrame({name: torch.as_tensor(s).double().numpy() for name, s in scores.items()})
    return table.corr(method="spearman")


def max_removable(n_blocks: int, criterion: str) -> int:
    """How many blocks ``criterion`` may remove: all but one, or all unprotected with '+'."""
    keep = plus_rule(criterion)
    protected = min(n_blocks, keep["keep_first"] + keep["keep_last"])
    return n_blocks - max(protected, 1)


@dataclass
class PruneExplorer:
    """Which blocks a criterion drops at a ratio, and the perplexity of the model without them.

    ``scores`` maps criterion base names to per-block scores; ``segments`` are the evaluation
    ids (``ppl_segments``). Results are cached by (criterion, blocks removed).
    """

    model: object
    scores: dict[str, torch.Tensor]
    segments: torch.Tensor
    run_dir: str | os.PathLike | None = None
    dataset: str = "wikitext2"
    batch_size: int = 8
    _cache: dict[str, float] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, model, tokenizer, scores: dict[str, torch.Tensor], run_dir=None, dataset: str = "wikitext2",
              seq_len: int = 128, max_segments: int | None = None, batch_size: int = 8) -> "PruneExplorer":
        segments = ppl_segments(tokenizer, dataset, seq_len, default_bos(model), max_segments)
        explorer = cls(model, scores, segments, run_dir, dataset, batch_size)
        explorer._load()
        return explorer

    @property
    def n_blocks(self) -> int:
        return len(get_blocks(self.model))

    @property
    def _cache_path(self) -> Path | None:
        return None if self.run_dir is None else Path(self.run_dir) / "explore" / f"{self.dataset}_ppl.json"

    def _load(self) -> None:
        path = self._cache_path
        if path is not None and path.exists():
            data = json.loads(path.read_text())
            if data.get("segments") == list(self.segments.shape):
                self._cache.update(data["ppl"])

    def _save(self) -> None:
        if self._cache_path is not None:
            payload = {"segments": list(self.segments.shape), "ppl": self._cache}
            atomic_write_text(self._cache_path, json.dumps(payload, indent=1, sort_keys=True) + "\n")

    def removed(self, criterion: str, n: int) -> list[int]:
        """The ``n`` blocks ``criterion`` drops ('+' protects the first 4 and last 2)."""
        base, _ = split_criterion(criterion)
        if base not in self.scores:
            raise KeyError(f"no scores for {base!r} in this explorer; have: {', '.join(sorted(self.scores))}")
        keep = plus_rule(criterion)
        check_removable(self.n_blocks, n, **keep)
        return blocks_to_remove(self.scores[base], n, **keep)

    def ppl_without(self, blocks: list[int]) -> float:
        """Perplexity on the evaluation segments with ``blocks`` skipped (cached by block set)."""
        key = ",".join(map(str, sorted(blocks))) or "dense"
        if key not in self._cache:
            with skipping_blocks(self.model, blocks):
                nll = token_nll(self.model, self.segments, self.batch_size)
            self._cache[key] = math.exp(nll.double().mean().item())
            self._save()
        return self._cache[key]

    def evaluate(self, criterion: str, n: int) -> dict:
        """``{"criterion", "n", "ratio", "removed", "ppl"}`` for ``n`` blocks removed by ``criterion``."""
        removed = self.removed(criterion, n)
        return {"criterion": criterion, "n": n, "ratio": n / self.n_blocks, "removed": removed,
                "ppl": self.ppl_without(removed)}

    def sweep(self, criteria: list[str], ns: list[int], progress: bool = True) -> pd.DataFrame:
        """One row per (criterion, n) plus the dense model at n = 0."""
        rows = [{"criterion": c, "n": 0, "ratio": 0.0, "removed": [], "ppl": self.ppl_without([])} for c in criteria]
        pairs = [(c, n) for c in criteria for n in ns]
        for c, n in tqdm(pairs, desc=f"{self.dataset} PPL of pruned models", disable=not progress):
            rows.append(self.evaluate(c, n))
        return pd.DataFrame(rows)


def _png(fig) -> bytes:
    """The figure as PNG bytes (as the inline backend would show it), then closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def explorer_widget(explorer: PruneExplorer, criteria: list[str] | None = None, n: int | None = None, *,
                    preset: str | None = None, model: str | None = None):
    """Dropdown (criterion) x slider (blocks removed, bounded by what the criterion allows).

    Shows the score bars with the removed blocks in red and the resulting perplexity; the
    first view (``n`` blocks, default 1) is drawn at once, so pick an ``n`` already swept to
    keep a headless run quick. Callbacks only run on user input: papermill never waits.
    ``preset`` and ``model`` stamp every view (``plots.stamp``), as the saved figures are.
    """
    import ipywidgets as widgets
    from IPython.display import Image, display

    from .plots import plot_block_scores, stamp

    criteria = criteria or sorted(explorer.scores) + [f"{c}+" for c in ("ppl", "taylor", "magnitude") if c in explorer.scores]
    L = explorer.n_blocks

    def options(criterion):
        return [(f"{k / L:.0%} ({k} blocks)", k) for k in range(1, max_removable(L, criterion) + 1)]

    pick = widgets.Dropdown(options=criteria, value=criteria[0], description="criterion")
    count = widgets.SelectionSlider(options=options(criteria[0]), description="remove", continuous_update=False)
    out = widgets.Output()
    # Drawing and PNG-encoding the bars takes ~0.6 s on one CPU thread, longer than the cached
    # PPL lookup (~1 ms); keeping each view's PNG lets a choice seen before answer at once.
    drawn: dict[tuple[str, int], bytes] = {}

    def show(*_):
        key = (pick.value, count.value)
        with out:
            out.clear_output(wait=True)
            result = explorer.evaluate(*key)
            # the answer as text first (readable without the figure: screen readers, the browser
            # tests), flushed so it shows while the figure is drawn
            print(f"{pick.value}: removed blocks {result['removed']} -> {explorer.dataset} PPL {result['ppl']:.2f}",
                  flush=True)
            if key not in drawn:
                base, _ = split_criterion(pick.value)
                fig = plot_block_scores(explorer.scores[base], pick.value, removed=result["removed"])
                fig.axes[0].set_title(f"{pick.value}: remove {result['removed']} -> {explorer.dataset} PPL {result['ppl']:.2f}")
                if preset is not None and model is not None:
                    stamp(fig, preset, model)
                drawn[key] = _png(fig)
            display(Image(drawn[key]))

    def on_criterion(change):
        current = count.value
        count.options = options(change["new"])
        count.value = min(current, count.options[-1][1])
        show()

    if n is not None:
        count.value = min(n, count.options[-1][1])
    pick.observe(on_criterion, names="value")
    count.observe(show, names="value")
    show()
    return widgets.VBox([widgets.HBox([pick, count]), out])


def scores_widget(scores: dict[str, torch.Tensor], n: int, *, preset: str | None = None, model: str | None = None):
    """Dropdown (criterion, '+' variants included) -> its score bars and the ``n`` blocks it drops.

    ``preset`` and ``model`` stamp the figure (``plots.stamp``), as the saved figures are.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from .plots import plot_block_scores, stamp

    names = sorted(scores) + [f"{c}+" for c in ("ppl", "taylor", "magnitude") if c in scores]
    pick = widgets.Dropdown(options=names, value=names[0], description="criterion")
    out = widgets.Output()

    def show(*_):
        base, _ = split_criterion(pick.value)
        drop = blocks_to_remove(scores[base], n, **plus_rule(pick.value))
        with out:
            out.clear_output(wait=True)
            print(f"{pick.value} drops blocks {drop}")
            fig = plot_block_scores(scores[base], pick.value, removed=drop)
            if preset is not None and model is not None:
                stamp(fig, preset, model)
            plt.show()

    pick.observe(show, names="value")
    show()
    return widgets.VBox([pick, out])


# ---- notebook 07: depth vs width -------------------------------------------------------------

def generation_widget(models: dict, tokenizer, prompt: str, max_new_tokens: int):
    """Text box (prompt) + button (generate) -> every model's greedy continuation and timing
    (``depth_vs_width.generate_side_by_side``). Generation runs only when the button is pressed,
    so a headless papermill run never waits on it."""
    import ipywidgets as widgets
    from IPython.display import display

    from .depth_vs_width import generate_side_by_side

    prompt_box = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="70%"))
    go = widgets.Button(description="generate", button_style="primary")
    out = widgets.Output()

    def on_click(_):
        with out:
            out.clear_output()
            display(generate_side_by_side(models, tokenizer, prompt_box.value, max_new_tokens=max_new_tokens))

    go.on_click(on_click)
    return widgets.VBox([widgets.HBox([prompt_box, go]), out])


def ratio_widget(model_name: str, run_dir: str | os.PathLike, preset="smoke", ratio: float = 0.2):
    """Slider (pruning ratio, 0.1-0.5) -> params, batch-1 latency and WikiText-2 PPL of depth and
    width pruning at that ratio (``depth_vs_width.explore_ratio``, cached in ``run_dir``, so a
    ratio seen before answers at once). Nothing is computed until the slider moves."""
    import ipywidgets as widgets
    from IPython.display import display

    from .depth_vs_width import explore_ratio

    slider = widgets.FloatSlider(value=ratio, min=0.1, max=0.5, step=0.05, description="ratio",
                                 continuous_update=False, readout_format=".2f")
    out = widgets.Output()

    def on_ratio(change):
        with out:
            out.clear_output()
            display(explore_ratio(model_name, change["new"], run_dir, preset)[["method", "params", "blocks",
                                                                               "latency_b1_s", "wikitext2_ppl"]])

    slider.observe(on_ratio, names="value")
    return widgets.VBox([slider, out])
