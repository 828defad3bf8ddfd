"""A feature's dashboard as a PNG: the histogram of non-zero activations (log10 bins) and the
top examples with each token shaded by its activation."""

from __future__ import annotations

from pathlib import Path


def plot_feature(info, index: int, run, stats, labels, out: str | Path,
                 examples: int = 8) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saereg.analysis.labels import current
    from saereg.analysis.tokens import display_token

    out = Path(out)
    if out.suffix.lower() != ".png":
        from saereg.registry.errors import UsageError

        raise UsageError(f"the plot is a PNG: give a path ending in .png, not {out.name!r}")
    hist = stats.histogram
    counts = hist["counts"]
    width = (hist["log10_high"] - hist["log10_low"]) / len(counts)
    edges = [hist["log10_low"] + i * width for i in range(len(counts))]
    shown = stats.top_examples[:examples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 3 + 0.45 * max(len(shown), 1)),
                                   gridspec_kw={"height_ratios": [2, max(len(shown), 1) / 3]})
    lab = current(labels)
    fig.suptitle(f"{info.ref} feature {index}" + (f": {lab.text}" if lab else "")
                 + f"\nrate {stats.firing_rate:.2e}, max {stats.max_activation:.3g} "
                 f"(stats run {run.id}, {run.tokens} tokens)", fontsize=10)
    ax1.bar(edges, counts, width=width, align="edge", color="tab:blue")
    ax1.set_xlabel("log10(activation)")
    ax1.set_ylabel("count")
    ax2.axis("off")
    top = max((max(e["acts"]) for e in shown), default=1.0) or 1.0
    for row, ex in enumerate(shown):
        y = 1 - (row + 0.5) / max(len(shown), 1)
        x = 0.0
        ax2.text(x, y, f"{ex['activation']:.2f} ", fontsize=8, va="center", family="monospace")
        x = 0.07
        for tok, act in zip(ex["tokens"], ex["acts"]):
            t = display_token(tok)
            shade = max(0.0, act) / top
            ax2.text(x, y, t, fontsize=8, va="center", family="monospace",
                     bbox={"facecolor": (1, 1 - 0.8 * shade, 1 - 0.8 * shade), "pad": 0.5,
                           "edgecolor": "none"})
            x += 0.0075 * max(len(t), 1) + 0.004
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
