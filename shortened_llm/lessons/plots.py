"""Seaborn figures the notebooks show; each returns its Figure and can save it under ``run_dir``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

__all__ = ["save_figure", "plot_block_scores", "plot_reference_curve", "plot_ppl_bars", "plot_generation_sweep",
           "plot_score_heatmap", "plot_rank_correlation", "plot_ppl_vs_ratio", "plot_quant_table",
           "plot_replaceme_residuals", "stamp", "plot_recovery_ppl", "plot_units_speed_kv", "SCORE_LABELS", "plot_residual_cosine"]

sns.set_theme(style="whitegrid", context="notebook")


def save_figure(fig, name: str, run_dir: str | os.PathLike | None) -> Path | None:
    """``run_dir/figures/<name>.png`` (the reproduce command copies them to figures/)."""
    if run_dir is None:
        return None
    path = Path(run_dir) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_block_scores(scores: Sequence[float], criterion: str, removed: Sequence[int] = (), log: bool = False, ax=None):
    """Bars of one criterion's per-block scores; the blocks a pruning would drop in red.

    The y label says what the number is (``SCORE_LABELS``: a PPL, a sum of |w|, an angle), not just "score".
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3.2))
    df = pd.DataFrame({"block": range(len(scores)), "score": list(map(float, scores))})
    df["fate"] = ["removed" if b in set(removed) else "kept" for b in df.block]
    sns.barplot(df, x="block", y="score", hue="fate", palette={"kept": "#4c72b0", "removed": "#c44e52"},
                dodge=False, ax=ax)
    if log:
        ax.set_yscale("log")
    label = SCORE_LABELS.get(criterion.rstrip("+"), "score")
    ax.set_ylabel(f"{label} (log scale)" if log else label, fontsize=8)
    ax.set_xlabel("block (0 = next to the embeddings)")
    ax.set_title(f"Block importance: {criterion} (higher = more important)")
    ax.tick_params(axis="x", labelsize=8)
    return ax.figure


def plot_reference_curve(ours: Sequence[float], reference: pd.DataFrame, label: str = "ours",
                         dense: float | None = None, ax=None):
    """Calibration PPL with block i removed, relative, against normalised depth i / (L - 1), log scale.

    ``reference`` has columns model, removed_block, calibration_ppl (official_block_ppl.csv). Each
    model is scored on its own text (BookCorpus there, our books here) and starts from its own PPL,
    so raw curves do not compare: each is divided by its cheapest removal, the lowest point of its
    curve. That stands in for the dense PPL, which the official CSVs do not publish; ``dense`` (our
    model's dense calibration PPL) draws where dense sits on our scale, to show how close the two are.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    for model, df in reference.groupby("model"):
        depth = df.removed_block / df.removed_block.max()
        ax.plot(depth, df.calibration_ppl / df.calibration_ppl.min(), lw=1, alpha=0.7, label=model)
    n, cheapest = len(ours), min(map(float, ours))
    ax.plot([i / (n - 1) for i in range(n)], [float(p) / cheapest for p in ours], "k-o", lw=2.5, ms=4, label=label)
    if dense is not None:
        ax.axhline(float(dense) / cheapest, color="black", ls="--", lw=1, label=f"dense, {label}")
    ax.set_yscale("log")
    ax.set_xlabel("depth of the removed block (0 = first block, 1 = last)")
    ax.set_ylabel("PPL without the block / cheapest removal\n(log scale)")
    ax.set_title("Removing one block: the paper's models and ours")
    ax.legend(fontsize=8, ncol=2)
    return ax.figure


def plot_ppl_bars(table: pd.DataFrame, x: str = "model", y: str = "ppl", hue: str | None = "dataset", ax=None, log: bool = True,
                  *, dense: "float | Mapping[str, float] | None" = None, dense_label: str = "dense", ylabel: str | None = None, title: str | None = None):
    """Grouped bars of perplexities (one bar per model x dataset), value on top.

    ``dense``: the dense model's value, drawn as a dashed line across the bars, so a reader sees how
    much of the gap to it a method closed (its legend entry reads ``dense_label`` and the value). A
    mapping from ``hue`` values to numbers draws one line per hue in that hue's colour: the dense
    model's PPL differs per dataset, and one line for all would mislead.
    ``ylabel`` replaces the column name on the y axis; a log axis says so in the label.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    sns.barplot(table, x=x, y=y, hue=hue, ax=ax)
    for container in ax.containers:
        ax.bar_label(container, fmt="%.1f", fontsize=8)
    if log:
        ax.set_yscale("log")
    if isinstance(dense, Mapping):
        for handle, level in zip(*ax.get_legend_handles_labels()):  # seaborn's legend: one patch per hue value
            if level in dense:
                ax.axhline(float(dense[level]), color=handle.get_facecolor(), ls="--", lw=1.2, zorder=3,
                           label=f"{dense_label}, {level} ({float(dense[level]):.1f})")
    elif dense is not None:
        ax.axhline(float(dense), color="black", ls="--", lw=1.2, zorder=3, label=f"{dense_label} ({float(dense):.1f})")
    if dense is not None:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: no bar hidden behind it
    if ylabel is not None:
        ax.set_ylabel(f"{ylabel} (log scale)" if log else ylabel)
    if title is not None:
        ax.set_title(title)
    ax.set_xlabel("")
    return ax.figure


def plot_generation_sweep(table: pd.DataFrame, new_tokens: int | None = None, shape: str | None = None):
    """Throughput against batch size (log-log), and each pruned model's speed-up over dense (notebook 07).

    ``table`` is ``efficiency.sweep_generation``'s output; rows not ``status == "ok"`` (OOM) are
    left out; ``new_tokens`` and ``shape`` pick one output length and one model shape. Throughput
    spans orders of magnitude from batch 1 to 256, hence the log y axis. A timing without its spread
    reads as more certain than it is: each point is the median over rounds, and its bar runs from the
    slowest round's median to the fastest single call (``latency_min_s``), so a bar exists even with
    one round of several calls; the title says how many rounds and calls the bars come from.
    """
    from matplotlib import ticker

    from ..efficiency import speedup_table  # one definition of a speed-up (medians over rounds)

    df = table[table.status == "ok"]
    if new_tokens is not None:
        df = df[df.new_tokens == new_tokens]
    if shape is not None:
        df = df[df["shape"] == shape]
    df = df.assign(fastest=df.batch_size * df.new_tokens / df.latency_min_s)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    models = list(dict.fromkeys(df.model))
    colours = dict(zip(models, sns.color_palette(n_colors=len(models))))
    for name, g in df.groupby("model", sort=False):
        per_batch = g.groupby("batch_size").agg(mid=("tokens_per_s", "median"), low=("tokens_per_s", "min"),
                                                high=("fastest", "max"))
        ax1.errorbar(per_batch.index, per_batch.mid, yerr=[per_batch.mid - per_batch.low, per_batch.high - per_batch.mid],
                     marker="o", capsize=3, color=colours[name], label=name)
    ax1.set_yscale("log")
    low, high = ax1.get_ylim()
    ax1.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 10, 100, not 10^1, 10^2
    ax1.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}") if high / low < 10 else ticker.NullFormatter())
    ax1.set_xlabel("batch size (log scale)")
    ax1.set_ylabel("generated tokens per second (log scale)")
    ax1.set_title("Throughput, higher is better")
    ax1.legend(fontsize=8)
    speed = speedup_table(df)
    pruned = speed[speed.model != "dense"]
    for name, g in pruned.groupby("model", sort=False):
        ax2.plot(g.batch_size, g.speedup_median, marker="o", color=colours[name], label=f"{name}, median")
        ax2.plot(g.batch_size, g.speedup_min, marker="^", ls=":", color=colours[name], alpha=0.7,
                 label=f"{name}, fastest calls")
    ax2.axhline(1, color="grey", ls="--", lw=1)
    ax2.text(0.01, 1, " dense = 1", va="bottom", fontsize=8, color="grey", transform=ax2.get_yaxis_transform())
    batches = sorted(set(df.batch_size))
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
    ax2.set_xlabel("batch size (log scale)")
    ax2.set_ylabel("speed-up over dense (dense latency / latency)")
    ax2.set_title("Speed-up of each pruned model, above 1 = faster")
    ax2.legend(fontsize=8)
    device = ", ".join(sorted(set(df.get("device", pd.Series(["?"])).astype(str))))
    shapes = ", ".join(sorted(set(df["shape"]))) + ", " if "shape" in df else ""
    rounds = df["round"].nunique() if "round" in df else 1
    calls = int(df.repeats.max()) if "repeats" in df and df.repeats.notna().any() else 1
    fig.suptitle(f"Generation, {shapes}{', '.join(map(str, sorted(set(df.new_tokens))))} new tokens, {device}; "
                 f"bars: {rounds} round(s) x {calls} timed call(s)")
    fig.tight_layout()
    return fig


# ---- block importance (notebooks 01-02) ---------------------------------------------------------

def plot_score_heatmap(scores: dict, ax=None):
    """Criteria x blocks, each row min-max normalised to [0, 1] so criteria on any scale compare.

    1 = the block that criterion finds most important, 0 = the one it would drop first.
    """
    import numpy as np

    rows = {}
    for name, s in scores.items():
        v = np.asarray([float(x) for x in s], dtype=float)
        span = v.max() - v.min()
        rows[name] = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    df = pd.DataFrame(rows).T
    if ax is None:
        _, ax = plt.subplots(figsize=(max(8, 0.32 * df.shape[1]), 0.45 * len(df) + 1.2))
    sns.heatmap(df, cmap="viridis", vmin=0, vmax=1, ax=ax, cbar_kws={"label": "normalised score"})
    ax.set_xlabel("block")
    ax.set_title("Block importance by criterion (per-row min-max; dark = dropped first)")
    return ax.figure


def plot_rank_correlation(corr: pd.DataFrame, ax=None):
    """Spearman correlation between criteria, annotated; diverging colours centred on 0."""
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 * len(corr) + 2, 0.8 * len(corr) + 1))
    sns.heatmap(corr, annot=True, fmt=".2f", cmap="vlag", vmin=-1, vmax=1, square=True, ax=ax)
    ax.set_title("Spearman rank correlation of block scores")
    return ax.figure


def plot_ppl_vs_ratio(table: pd.DataFrame, dataset: str = "WikiText-2", ax=None):
    """Perplexity of the pruned model against the pruning ratio, one line per criterion, dense as a line.

    ``table`` is ``PruneExplorer.sweep``'s output (its ``n == 0`` rows are the dense model). The y
    axis turns logarithmic only when the values span more than 3x (as at 35 % and beyond), and says so.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(table.assign(percent=100 * table.ratio), x="percent", y="ppl", hue="criterion", marker="o", ax=ax)
    dense = table[table.n == 0].ppl
    if not dense.empty:
        ax.axhline(float(dense.iloc[0]), color="grey", ls="--", lw=1, label=f"dense ({float(dense.iloc[0]):.1f})")
        ax.legend(fontsize=8)
    log = table.ppl.max() / table.ppl.min() > 3
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("blocks removed (% of all blocks)")
    ax.set_ylabel(f"{dataset} perplexity" + (" (log scale)" if log else ""))
    ax.set_title(f"{dataset} perplexity after one-shot depth pruning")
    return ax.figure


# ---- GGUF quantisation (notebook 08) ------------------------------------------------------------

QUANT_MARKER_SIZE = 36  # points^2: the markers, and the room the labels leave them


def plot_quant_table(table: pd.DataFrame, reference: str | None = None, note: str = "", ax=None):
    """Perplexity (relative to ``reference``'s f16 file) against file size, one point per GGUF type, labelled.

    ``table`` is ``quant_table.quant_table``'s output. ``reference``: the model whose f16 PPL is 1
    (default: the last model, the dense one when the table has one), so points of a pruned and a
    dense model compare on one scale: at equal size (x), lower is better. Filled markers: made with
    the importance matrix. ``note`` goes in a corner (model, preset, segments).
    """
    models = list(dict.fromkeys(table.model))
    reference = reference or models[-1]
    ref = table[(table.model == reference) & (table.type == "f16")].ppl
    if ref.empty:
        raise ValueError(f"reference={reference!r} has no f16 row; models in the table: {', '.join(map(str, models))}")
    df = table[table.same_file_as.fillna("") == ""].assign(rel=lambda d: d.ppl / float(ref.iloc[0]))  # aliases: one point
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 6))
    colours = dict(zip(models, sns.color_palette(n_colors=len(models))))
    for (model, imatrix), g in df.groupby(["model", "imatrix"], sort=False):
        ax.scatter(g.size_mb, g.rel, s=QUANT_MARKER_SIZE, marker="o", edgecolors=colours[model], linewidths=1.4,
                   facecolors=colours[model] if imatrix else "none",
                   label=f"{model}, {'with' if imatrix else 'without'} imatrix", zorder=3)
    ax.axhline(1, color="grey", lw=1, ls="--", zorder=1)
    ax.text(ax.get_xlim()[1], 1, f"{reference} f16 ", va="top", ha="right", fontsize=8, color="grey")
    if df.rel.max() / df.rel.min() > 3:  # Q2_K of a small model can be many times worse: log, so the rest still reads
        ax.set_yscale("log")
        plain = plt.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "1235" else "")  # 1, 2, 3, 5, 10, 20, ...
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("GGUF file size (MB)")
    ax.set_ylabel(f"WikiText-2 PPL / PPL of {reference} f16" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title("Quantisation types: perplexity against file size (lower left is better)")
    ax.legend(fontsize=8, loc="upper right")
    if note:
        ax.text(0.01, 0.99, note, transform=ax.transAxes, fontsize=8, color="grey", va="top")
    low, high = ax.get_ylim()
    ax.set_ylim(top=high + 0.08 * (high - low))  # room for the top labels
    # labels: the first of a few offsets whose text, with a little margin, covers no label placed before
    # and no other point's marker (small types first); a label with nowhere free is left out
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    rows = list(df.sort_values("size_mb").itertuples())
    markers = [_marker_box(ax, r.size_mb, r.rel, size=QUANT_MARKER_SIZE) for r in rows]
    placed = []
    offsets = [(dx, dy) for dy in (3, -10, 12, -19, 21, -28) for dx in (5, -5)]
    for i, r in enumerate(rows):
        obstacles = placed + markers[:i] + markers[i + 1:]
        for dx, dy in offsets:
            text = ax.annotate(r.type, (r.size_mb, r.rel), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                               ha="left" if dx > 0 else "right", color=colours[r.model])
            box = text.get_window_extent(renderer).padded(1.5)
            if not any(box.overlaps(b) for b in obstacles):
                placed.append(box)
                break
            text.remove()
    return fig


def _marker_box(ax, x: float, y: float, size: float):
    """The display-space box a scatter marker of area ``size`` (points^2) covers at data point (x, y)."""
    from matplotlib.transforms import Bbox

    cx, cy = ax.transData.transform((x, y))
    r = (size ** 0.5) / 2 * ax.figure.dpi / 72 + 1
    return Bbox.from_extents(cx - r, cy - r, cx + r, cy + r)


def plot_replaceme_residuals(fits, ax=None):
    """Per removed span: how far the stream lands from where the span would have taken it, before and after ReplaceMe.

    ``fits`` are ``replaceme.SpanFit``: the mean squared residual per token ``||L - h||^2``
    of plain removal, and ``||L - (Y + M T)||^2`` with the fitted map, on the calibration tokens.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    rows = [{"span": f"{f.span[0]}-{f.span[1]}" if f.span[0] != f.span[1] else str(f.span[0]), "fit": name, "residual": value}
            for f in fits for name, value in (("plain removal", f.residual_before), ("ReplaceMe", f.residual_after))]
    sns.barplot(pd.DataFrame(rows), x="span", y="residual", hue="fit", palette={"plain removal": "#c44e52", "ReplaceMe": "#4c72b0"},
                ax=ax)
    ax.set_yscale("log")
    ax.set_xlabel("removed span (original block indices)")
    ax.set_ylabel("mean squared residual per token")
    ax.set_title("Distance to the removed span's output, on calibration tokens")
    return ax.figure


def stamp(fig_or_ax, preset: str, model: str | os.PathLike):
    """Write ``preset · model`` small and grey in the figure's lower right corner, and return the Figure.

    A saved PNG travels without its notebook: a learner comparing a ``tiny`` figure with a ``paper`` one,
    or a CPU run with the committed GPU one, must see which run drew it. A model given as a path is
    shown by its last component (``/tmp/x/pruned-20`` -> ``pruned-20``), so no machine's paths end up
    in a figure. Call it once per figure, after the axes are drawn.
    """
    fig = fig_or_ax if isinstance(fig_or_ax, plt.Figure) else fig_or_ax.figure
    name = Path(str(model).rstrip("/")).name or str(model)
    fig.text(0.995, 0.005, f"preset {preset} · {name}", ha="right", va="bottom", fontsize=7, color="grey")
    return fig


# ---- the residual stream and block scores (notebooks 01-03) ---------------------------------------

# What each criterion's number is, for a y axis (plot_block_scores); a "+" variant has its base's scores
SCORE_LABELS = {
    "ppl": "calibration PPL\nwithout the block",
    "taylor": "sum |w * dL/dw|",
    "magnitude": "sum |w|",
    "bi": "1 - cos(h_in, h_out)",
    "angular": "smallest angle / pi\nof a span with it",
    "sleb": "greedy removal step",
    "reverse": "depth rank",
    "random": "random rank",
}


def plot_residual_cosine(cosine: Sequence[float], ax=None):
    """Mean cos(h_in, h_out) per block: how little each block turns the residual stream (1 = not at all).

    ``cosine`` is ``1 - block_importance(..., "bi")``. A block whose output points where its input
    did adds little to the stream, which is why it can be skipped; the first blocks turn it most.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3.2))
    values = list(map(float, cosine))
    ax.plot(range(len(values)), values, "-o", ms=4, color="#4c72b0")
    ax.axhline(1, color="grey", ls="--", lw=1)
    ax.text(len(values) - 1, 1, "1 = the block changes nothing ", ha="right", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("block (0 = next to the embeddings)")
    ax.set_ylabel("mean cos(h_in, h_out)\nover calibration tokens")
    ax.set_title("How far each block turns the residual stream")
    low = min(values)
    ax.set_ylim(low - 0.08 * (1 - low) - 1e-3, 1 + 0.1 * (1 - low) + 1e-3)
    return ax.figure


def plot_recovery_ppl(rows: pd.DataFrame, ratio: float, dense_ppl: float, catastrophic: float = 10.0):
    """Notebook 09's PPL after each retraining at one ``ratio``: every model on a log axis, then the usable ones.

    ``rows`` has one row per model and seed (criterion, method, seed, wikitext2_ppl). A model more
    than ``catastrophic`` times the dense PPL has lost language modelling; on one log axis with it
    the differences that matter between the usable models (a few PPL points) vanish, so the right
    panel shows only the models below that line, on a linear axis, and names the ones left out.
    Each seed is a dot (``random`` has several), so a mean pulled up by one bad seed cannot hide.
    """
    df = rows[(rows.ratio == ratio) & (rows.criterion != "dense")]
    methods = list(dict.fromkeys(df.method))
    palette = dict(zip(methods, sns.color_palette(n_colors=len(methods))))
    usable = df[df.wikitext2_ppl <= catastrophic * dense_ppl]
    seeds = df.groupby(["criterion", "method"]).seed.transform("nunique")
    left_out = [f"{r.criterion} / {r.method}" + (f" (seed {r.seed})" if n > 1 else "")
                for r, n in zip(df.itertuples(), seeds) if r.wikitext2_ppl > catastrophic * dense_ppl]
    fig, (ax_all, ax_zoom) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    for ax, part in ((ax_all, df), (ax_zoom, usable)):
        if part.empty:
            continue
        order = sorted(set(part.criterion))
        if ax is ax_all:  # a median over the usable seeds only would mislead: the zoom shows the seeds alone
            sns.barplot(part, x="criterion", y="wikitext2_ppl", hue="method", hue_order=methods, order=order,
                        palette=palette, estimator="median", errorbar=None, alpha=0.45, ax=ax, legend=False)
        sns.stripplot(part, x="criterion", y="wikitext2_ppl", hue="method", hue_order=methods, order=order, palette=palette,
                      dodge=True, size=5 if ax is ax_all else 7, edgecolor="k", linewidth=0.5, ax=ax, legend=ax is ax_zoom)
        ax.axhline(dense_ppl, color="k", ls="--", lw=1)
        ax.text(0.99, dense_ppl, "dense ", transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=8)
        ax.set_xlabel("pruning criterion")
    ax_all.set_yscale("log")
    ax_all.axhline(catastrophic * dense_ppl, color="#c44e52", ls=":", lw=1)
    ax_all.text(0.01, catastrophic * dense_ppl, f" {catastrophic:g}x dense: catastrophic above", color="#c44e52", fontsize=8,
                transform=ax_all.get_yaxis_transform(), va="bottom")
    ax_all.set_ylabel("WikiText-2 perplexity (log scale)")
    ax_all.set_title("Every model (bars: median over seeds, dots: seeds)")
    ax_zoom.set_ylabel("WikiText-2 perplexity (linear)")
    ax_zoom.set_ylim(bottom=0)
    ax_zoom.set_title(f"Usable models only (below {catastrophic:g}x dense; dots: seeds), lower is better")
    if left_out:
        ax_zoom.set_xlabel("pruning criterion\nleft out, catastrophic: " + ", ".join(left_out), fontsize=9)
    ax_zoom.legend(title="retraining", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"PPL after retraining, {ratio:.0%} of the blocks removed")
    fig.tight_layout()
    return fig


def plot_units_speed_kv(speed: pd.DataFrame, calls: int):
    """Notebook 09's generation speed-up over dense and measured KV cache, per prompt length and pruned unit.

    ``speed`` is ``unit_comparison.relative_to``'s table, one median of ``calls`` timed calls per bar:
    no spread is recorded, and the title says so, so a 5 % difference is not read as a result.
    """
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    sns.barplot(speed, x="context", y="speedup", hue="model", ax=a)
    a.axhline(1, color="k", ls="--", lw=1)
    a.set_xlabel("prompt length (tokens)")
    a.set_ylabel("speed-up over dense (dense latency / latency)")
    a.set_title(f"Batch-1 generation, higher = faster (median of {calls} call(s), no spread)")
    sns.barplot(speed, x="context", y="kv_cache_mb", hue="model", ax=b)
    b.set_xlabel("prompt length (tokens)")
    b.set_ylabel("KV cache after the prompt (MiB)")
    b.set_title("Keys and values the cache holds (measured)")
    fig.tight_layout()
    return fig
