"""Training curves from a run's metrics.jsonl: losses and error rates against the step, one PNG."""

from __future__ import annotations

from pathlib import Path

from xlsr_jax.rundir import read_metrics

LOSS_KEYS = ("train/loss", "eval/loss")
RATE_KEYS = ("eval/wer", "eval/cer")


def read_curves(
    metrics_jsonl: str | Path, keys: tuple[str, ...] = LOSS_KEYS + RATE_KEYS
) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...] sorted by step} for each of `keys` that has at least one point.

    A resumed run appends to the same file, so steps can repeat (1, 2, 3, 4, 3, 4): a line whose step
    is below the previous line's starts the resumed run, and everything logged earlier at or after
    that step is dropped (the abandoned run's points, eval ones included). Within one run the later
    line for a (key, step) wins. Unreadable lines (a crash mid-write) are skipped with a warning.
    """
    points: dict[str, dict[int, float]] = {key: {} for key in keys}
    last_step = None
    for record in read_metrics(metrics_jsonl):
        step = record["step"]
        if last_step is not None and step < last_step:
            for by_step in points.values():
                for stale in [s for s in by_step if s >= step]:
                    del by_step[stale]
        last_step = step
        for key in keys:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                points[key][step] = float(value)
    return {key: sorted(by_step.items()) for key, by_step in points.items() if by_step}


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Write a two-panel PNG (losses; WER/CER in %) against the step. None, and no file, when the
    metrics file is missing or holds none of the plotted keys."""
    return plot_panels(metrics_jsonl, out_png, [(LOSS_KEYS, 1.0, "CTC loss", "Loss"),
                                                (RATE_KEYS, 100.0, "error rate (%)", "Eval WER / CER")])


# xlsr-jax pretrain's curves: (keys, scale, y label, title) per panel.
PRETRAIN_PANELS = (
    (("pretrain/loss", "eval/loss", "pretrain/contrastive_loss", "eval/contrastive_loss"), 1.0,
     "per masked frame", "Loss (contrastive + weighted diversity)"),
    (("pretrain/diversity_loss", "eval/diversity_loss"), 1.0, "per masked frame", "Diversity loss"),
    (("pretrain/codevector_perplexity", "eval/codevector_perplexity"), 1.0, "codes in use", "Codevector perplexity"),
    (("pretrain/gumbel_temperature", "pretrain/masked_share"), 1.0, "", "Gumbel temperature, masked share"),
    (("pretrain/learning_rate",), 1.0, "", "Learning rate"),
    (("pretrain/grad_norm",), 1.0, "", "Gradient norm"),
)


def plot_pretraining_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
    """`plot_training_curves` for `xlsr-jax pretrain`: the panels of PRETRAIN_PANELS, in two rows."""
    return plot_panels(metrics_jsonl, out_png, PRETRAIN_PANELS, columns=3)


def plot_panels(metrics_jsonl: str | Path, out_png: str | Path, panels, columns: int | None = None) -> Path | None:
    """A PNG of one panel per (keys, scale, y label, title) of `panels` against the step, `columns` a row.
    None, and no file, when the metrics file is missing or holds none of the plotted keys."""
    metrics_jsonl, out_png = Path(metrics_jsonl), Path(out_png)
    if not metrics_jsonl.is_file():
        return None
    curves = read_curves(metrics_jsonl, tuple(k for keys, *_ in panels for k in keys))
    if not curves:
        return None
    # Figure + Agg canvas directly, not pyplot: no global backend switch, no display, no figure leak.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(5.5 * columns, 4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).reshape(-1)
    for ax, (keys, scale, ylabel, title) in zip(axes, panels):
        _panel(ax, curves, keys, scale=scale, ylabel=ylabel, title=title)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


def _panel(ax, curves, keys, *, scale: float, ylabel: str, title: str) -> None:
    plotted = False
    for key in keys:
        if key in curves:
            steps, values = zip(*curves[key])
            # Eval points are sparse: markers make a single evaluation visible.
            marker = "o" if key.startswith("eval/") else None
            ax.plot(steps, [scale * v for v in values], marker=marker, markersize=3, label=key)
            plotted = True
    ax.set_title(title)
    _label(ax, "step", ylabel, plotted, "no data yet")


def _label(ax, xlabel: str, ylabel: str, drawn: bool, empty: str) -> None:
    """Axis labels and grid; a legend when something was drawn, else `empty` in the middle."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)


def plot_sweep(points, keys, metric: str, log_keys=frozenset(), out_png: str | Path = "sweep.png") -> Path:
    """A sweep's metric against each searched key, one panel per key: `points` are (params, value, state)
    triples, state "complete" (filled dots) or "pruned" (hollow: its value is from the step it was
    ended at). Keys in `log_keys` get a log x axis; a key with non-numeric values, one tick per value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import numpy as np
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(4 * max(1, len(keys)), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(keys)), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        values = [params.get(key) for params, _, _ in points]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = [] if numeric else sorted({repr(v) for v in values})
        for state, style in (("complete", {}), ("pruned", {"facecolors": "none", "edgecolors": "C1"})):
            chosen = [(p.get(key), y) for p, y, s in points if s == state]
            if chosen:
                xs = [x if numeric else labels.index(repr(x)) for x, _ in chosen]
                ax.scatter(xs, [y for _, y in chosen], label=state, **style)
        if key in log_keys and numeric and values and min(values) > 0:
            ax.set_xscale("log")
            # Four labelled ticks over the values drawn: within one decade matplotlib's own labels
            # every minor tick, and they overlap.
            ticks = np.geomspace(min(values), max(values), 4 if min(values) < max(values) else 1)
            ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
        if labels:
            ax.set_xticks(range(len(labels)), labels)
        _label(ax, key, metric, bool(points), "no trial has ended yet")
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100, format="png")  # by name, not suffix: the caller may write a temporary file
    return out_png
