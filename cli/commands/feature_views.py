"""The feature dashboard as terminal text (click styles): labels, statistics, the histogram
as bars, top examples with activating tokens highlighted, top and bottom logits."""

from __future__ import annotations

import click

from saereg.analysis.tokens import display_token

BAR = 40


def example_line(ex: dict) -> str:
    peak = ex["peak"]
    top = max(ex["acts"]) or 1.0
    parts = []
    for i, (t, a) in enumerate(zip(ex["tokens"], ex["acts"])):
        t = display_token(t)
        if i == peak:
            parts.append(click.style(f"[{t}]", fg="red", bold=True))
        elif a > 0:
            parts.append(click.style(t, fg="yellow", bold=a > top / 2))
        else:
            parts.append(t)
    return "".join(parts)


def histogram_lines(hist: dict) -> list[str]:
    counts = hist["counts"]
    lo, hi = hist["log10_low"], hist["log10_high"]
    width = (hi - lo) / len(counts)
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return ["  (never fired)"]
    peak = max(counts)
    lines = []
    for i in range(nz[0], nz[-1] + 1):
        a, b = 10 ** (lo + i * width), 10 ** (lo + (i + 1) * width)
        bar = "#" * max(1 if counts[i] else 0, round(counts[i] / peak * BAR))
        lines.append(f"  {a:9.3g}-{b:<9.3g} {bar} {counts[i]}")
    return lines


def render_feature(info, index: int, run, stats, labels, examples: int = 5) -> str:
    out = [click.style(f"{info.ref} feature {index}", bold=True)
           + f"  ({info.model} {info.hook}, d_sae {info.d_sae})"]
    if labels:
        from saereg.analysis.labels import current

        lab = current(labels)
        out.append(f"current label: {lab.text if lab else '(none: every label was rejected)'}")
        out.append("labels:")
        for lab in labels:
            score = "" if lab.detection_score is None else f" score {lab.detection_score:.2f}"
            out.append(f"  [{lab.status}] {lab.text}  ({lab.method}"
                       f"{'/' + lab.model if lab.model else ''}, {lab.author}, "
                       f"{lab.created_at:%Y-%m-%d}{score})")
    else:
        out.append("labels: none")
    if run is None or stats is None:
        out.append(f"no statistics yet: run `saereg analyze {info.ref}`")
        return "\n".join(out)
    flag = f"  [{stats.flag.upper()}]" if stats.flag else ""
    out.append(f"stats run {run.id}: {run.tokens} tokens of {run.dataset}, context "
               f"{run.context_size}, code {run.code_version}")
    out.append(f"firing rate {stats.firing_rate:.3e}  mean {stats.mean_activation:.4g}  "
               f"max {stats.max_activation:.4g}{flag}")
    out.append("histogram of non-zero activations:")
    out.extend(histogram_lines(stats.histogram))
    if stats.top_examples:
        out.append("top examples:")
        for ex in stats.top_examples[:examples]:
            out.append(f"  {ex['activation']:8.3f}  {example_line(ex)}   "
                       f"<{ex['doc_id']} @{ex['doc_offset']}>")
    for name, rows in (("top logits", stats.top_logits), ("bottom logits", stats.bottom_logits)):
        out.append(f"{name}: " + "  ".join(f"{display_token(t)!r} {v:+.3f}" for t, v in rows))
    return "\n".join(out)
