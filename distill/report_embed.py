"""The `distill eval` report for sentence encoders (``results["task"] == "embedding"``): the same
self-contained HTML as ``distill.report``, with a summary table, bars per metric, a scatter of each
model's pair cosines against the teacher's, and training curves from ``--run`` directories."""

from __future__ import annotations

from typing import Optional

from distill.evaluate_embed import EMBED_GROUPS, EMBED_METRICS, OVERLAP_K
from distill.report import CSS, _curves, _esc, _png, _style, _summary, bar_chart, machine_chips, model_colors


def similarity_chart(name: str, m: dict, color: str) -> Optional[str]:
    """The model's cosine of a pair of examples against the teacher's, over a sample of pairs."""
    from matplotlib.figure import Figure

    sample = m.get("similarity_sample")
    if not sample or not sample.get("teacher"):
        return None
    fig = Figure(figsize=(3.9, 3.4), layout="constrained")
    ax = fig.add_subplot()
    xs, ys = sample["teacher"], sample["model"]
    lo, hi = min(min(xs), min(ys)), max(max(xs), max(ys))
    ax.plot([lo, hi], [lo, hi], color="#9ca3af", linewidth=1, linestyle="--")
    ax.scatter(xs, ys, s=4, alpha=0.35, color=color, linewidths=0)
    ax.set_xlabel("teacher's cosine of the pair", fontsize=8.5)
    ax.set_ylabel(f"{name}'s cosine", fontsize=8.5)
    rho = m.get("similarity_spearman")
    _style(ax, f"{name}: pair similarities" + (f" (ρ {rho:.3f})" if rho is not None else ""))
    return _png(fig)


def render_embedding(results: dict, curves: dict[str, list[dict]]) -> str:
    names = list(results["models"])
    colors = model_colors(names + [n for n in curves if n not in names])
    keys = ("similarity_spearman", "neighbour_agreement", f"neighbour_overlap_{OVERLAP_K}", "knn_accuracy",
            "latency_ms_p50", "examples_per_s")
    bars = [bar_chart(results, k, colors, EMBED_METRICS) for k in keys]
    figures = "".join(f"<figure><img alt='chart' src='{src}'></figure>" for src in bars if src)
    scatters = "".join(f"<figure><img alt='pair similarities' src='{src}'></figure>" for src in (
        similarity_chart(n, results["models"][n], colors[n]) for n in names if n != "teacher") if src)
    s = results.get("settings", {})
    speed_note = (f" Latency: {s.get('latency_examples')} examples one at a time (after a warmup; each the "
                  f"fastest of {s.get('latency_repeats')} runs), {s.get('threads')} threads; throughput: batches "
                  f"of {s.get('throughput_batch')}." if s.get("speed") else " Speed not measured (--no-speed).")
    models = ", ".join(f"<span class='swatch' style='background:{colors[n]}'></span>{_esc(n)}" for n in names)
    chips = [("data", results.get("data")), ("examples", s.get("examples")),
             ("labels", s.get("label_field") or "none")]
    chips += machine_chips(results)
    chip_html = "".join(f"<span class='chip'>{_esc(k)}: <b>{_esc(v)}</b></span>" for k, v in chips)
    header = (f"<header><h1>distill eval report: sentence encoders</h1><p class='sub'>Each model's pooled "
              f"embeddings of the same texts: their geometry against the teacher's, a label task when the data "
              f"has labels, speed and size.</p><div class='meta'><span class='chip'>models: {models}</span>"
              f"{chip_html}</div></header>")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>distill eval: {_esc(', '.join(names))}</title><style>{CSS}</style></head><body><main>",
             header,
             _summary(results, names, colors, groups=EMBED_GROUPS, metrics=EMBED_METRICS),
             f"<section><h2>Metrics side by side</h2><p class='note'>↓ lower is better, ↑ higher is better; hatched "
             f"bars: the teacher.{_esc(speed_note)}</p><div class='charts'>{figures}</div></section>",
             f"<section><h2>Pair similarities against the teacher's</h2><p class='note'>Each dot is a pair of "
             f"examples (a sample of up to 2,000): on the diagonal, the model sees the pair as the teacher does."
             f"</p><div class='charts'>{scatters}</div></section>" if scatters else "",
             _curves(curves, colors, eval_key="eval/similarity_mse", eval_title="eval similarity MSE",
                     train_title="training loss (per example)"),
             "<footer>written by distill eval</footer></main></body></html>\n"]
    return "".join(p for p in parts if p)


__all__ = ["render_embedding", "similarity_chart"]
