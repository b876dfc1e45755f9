"""The `distill eval` report for classifiers (``results["task"] == "classification"``): the same
self-contained HTML as ``distill.report`` (inline CSS, embedded PNGs, escaped text), with a summary
table, bars per metric, a reliability diagram, a confusion matrix per model, per-class precision /
recall, and training curves from ``--run`` directories."""

from __future__ import annotations

from typing import Optional

from distill.evaluate_classify import CLASS_GROUPS, CLASS_METRICS
from distill.report import (CSS, _curves, _esc, _png, _style, _summary, bar_chart, format_value, machine_chips,
                            model_colors)


def reliability_chart(results: dict, colors: dict[str, str]) -> Optional[str]:
    """Accuracy against confidence per bin, one line per model, on the diagonal of perfect calibration."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.9, 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#9ca3af", linewidth=1, linestyle="--", label="calibrated")
    drawn = False
    for name, m in results["models"].items():
        points = [(b["confidence"], b["accuracy"]) for b in m.get("reliability") or [] if b["count"]]
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.4, color=colors[name],
                label=f"{name} (ECE {m['ece']:.3f})", linestyle=":" if name == "teacher" else "-")
        drawn = True
    if not drawn:
        return None
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top-1 probability)", fontsize=8.5)
    ax.set_ylabel("accuracy in the bin", fontsize=8.5)
    ax.legend(fontsize=7.5, frameon=False, loc="upper left")
    _style(ax, "Reliability diagram")
    return _png(fig)


def confusion_chart(name: str, m: dict, labels: list[str], color: str) -> Optional[str]:
    """The confusion matrix as a heat map, each row (true class) normalized, counts written in."""
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    counts = m.get("confusion")
    if not counts:
        return None
    n = len(labels)
    rows = [[c / max(1, sum(row)) for c in row] for row in counts]
    size = min(5.5, 2.2 + 0.35 * n)
    fig = Figure(figsize=(size + 0.6, size), layout="constrained")
    ax = fig.add_subplot()
    cmap = LinearSegmentedColormap.from_list("c", ["#ffffff", color])
    ax.imshow(rows, cmap=cmap, vmin=0, vmax=1)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{counts[i][j]}", ha="center", va="center", fontsize=8,
                        color="white" if rows[i][j] > 0.6 else "#111827")
    ticks = list(range(n))
    short = [lab if len(lab) <= 12 else lab[:11] + "…" for lab in labels]
    ax.set_xticks(ticks, short, fontsize=8, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(ticks, short, fontsize=8)
    ax.set_xlabel("predicted", fontsize=8.5)
    ax.set_ylabel("true", fontsize=8.5)
    ax.set_title(f"{name}: accuracy {100 * m['accuracy']:.1f}%", fontsize=10, loc="left")
    return _png(fig)


def _per_class(results: dict, names: list[str], colors: dict[str, str]) -> str:
    labels = results.get("labels") or []
    head = "".join(f"<th colspan='3'><span class='swatch' style='background:{colors[n]}'></span>{_esc(n)}</th>"
                   for n in names)
    sub = "".join("<th>precision</th><th>recall</th><th>F1</th>" for _ in names)
    rows = []
    for label in labels:
        cells = []
        for n in names:
            c = results["models"][n].get("per_class", {}).get(label, {})
            cells += [f"<td>{_esc(format_value('accuracy', c.get(k)))}</td>" for k in ("precision", "recall", "f1")]
        support = next((results["models"][n]["per_class"][label]["support"] for n in names
                        if label in results["models"][n].get("per_class", {})), "")
        rows.append(f"<tr><td class='metric'>{_esc(label)}<span class='desc'>{_esc(support)} examples</span></td>"
                    f"{''.join(cells)}</tr>")
    return (f"<section><h2>Per class</h2><table class='summary'><thead><tr><th>class</th>{head}</tr>"
            f"<tr><th></th>{sub}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _header(results: dict, names: list[str], colors: dict[str, str]) -> str:
    examples = next((m.get("examples") for m in results["models"].values() if m.get("examples")), None)
    chips = [("data", results.get("data", "")), ("examples", f"{examples:,}" if examples else "?"),
             ("classes", ", ".join(results.get("labels") or []))]
    chips += machine_chips(results)
    models = ", ".join(f"<span class='swatch' style='background:{colors[n]}'></span>{_esc(n)}" for n in names)
    chip_html = "".join(f"<span class='chip'>{_esc(k)}: <b>{_esc(v)}</b></span>" for k, v in chips)
    sub = ("Teacher and students on the same labelled data: accuracy, calibration, fidelity to the teacher, speed "
           "and size." if "teacher" in names else "Classifiers on the same labelled data.")
    return (f"<header><h1>distill eval report: classifiers</h1><p class='sub'>{sub}</p>"
            f"<div class='meta'><span class='chip'>models: {models}</span>{chip_html}</div></header>")


def render_classification(results: dict, curves: dict[str, list[dict]]) -> str:
    names = list(results["models"])
    colors = model_colors(names + [n for n in curves if n not in names])
    bars = [bar_chart(results, k, colors, CLASS_METRICS) for k in
            ("accuracy", "macro_f1", "ece", "teacher_agreement", "latency_ms_p50", "examples_per_s")]
    bars.append(reliability_chart(results, colors))
    figures = "".join(f"<figure><img alt='chart' src='{src}'></figure>" for src in bars if src)
    confusions = "".join(f"<figure><img alt='confusion matrix' src='{src}'></figure>" for src in (
        confusion_chart(n, results["models"][n], results.get("labels") or [], colors[n]) for n in names) if src)
    s = results.get("settings", {})
    speed_note = (f" Latency: {s.get('latency_examples')} examples one at a time (after a warmup; each the "
                  f"fastest of {s.get('latency_repeats')} runs), "
                  f"{s.get('threads')} threads; throughput: batches of {s.get('throughput_batch')}."
                  if s.get("speed") else " Speed not measured (--no-speed).")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>distill eval: {_esc(', '.join(names))}</title><style>{CSS}</style></head><body><main>",
             _header(results, names, colors),
             _summary(results, names, colors, groups=CLASS_GROUPS, metrics=CLASS_METRICS),
             f"<section><h2>Metrics side by side</h2><p class='note'>↓ lower is better, ↑ higher is better; hatched "
             f"bars: the teacher.{_esc(speed_note)}</p><div class='charts'>{figures}</div></section>",
             f"<section><h2>Confusion matrices</h2><p class='note'>Rows: the true class; columns: the predicted one; "
             f"shading: the share of the row.</p><div class='charts'>{confusions}</div></section>" if confusions else "",
             _per_class(results, names, colors),
             _curves(curves, colors, eval_title="eval cross-entropy (nats per example)",
                     train_title="training loss (per example)"),
             "<footer>written by distill eval</footer></main></body></html>\n"]
    return "".join(p for p in parts if p)


__all__ = ["render_classification", "reliability_chart", "confusion_chart"]
