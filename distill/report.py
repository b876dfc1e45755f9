"""The `distill eval` report: ``eval.json`` and a self-contained ``report.html``.

``write_report(results, out_dir, runs=...)`` takes the dict ``distill.evaluate.evaluate_models``
returns. The HTML has no external resources: CSS is inline, the plots are matplotlib PNGs embedded
as base64 ``data:`` URIs, there are no scripts, and text from models and data is HTML-escaped (with
``://`` written as ``&#58;//``, so even sample text holds no literal URL). Both files are written
to a temporary name and renamed.

``eval.json`` is strict JSON (no NaN or Infinity tokens). A model whose outputs were non-finite
(``finite`` False in its results) is named in a warning at the top of the report and badged in the
summary table; the cells of the metrics it lacks for that reason (``nonfinite_metrics``) read
"non-finite" instead of a number, and the charts leave it out. ``nonfinite_warnings`` gives the
same warning lines to the CLI.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Optional

from distill.errors import UserError

TEACHER_COLOR = "#6b7280"
PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#db2777", "#0891b2", "#ca8a04", "#4f46e5"]
MAX_SAMPLES = 4
NONFINITE = "non-finite"  # what a cell shows for a metric that NaN or infinite outputs left uncomputed

# Rows of the summary table, in groups: (group title, metric keys). Labels and directions come
# from distill.evaluate.METRICS.
GROUPS = [
    ("Size", ["params", "size_mb"]),
    ("Likelihood on the data", ["eval_ce", "perplexity", "bits_per_byte", "top1_accuracy", "ece"]),
    ("Fidelity to the teacher", ["top1_agreement", "forward_kl", "reverse_kl", "draft_acceptance",
                                 "draft_expected_tokens"]),
    ("Fidelity on aligned spans (a model on another tokenizer)",
     ["aligned_forward_kl", "aligned_uld", "aligned_top1_agreement", "aligned_token_share"]),
    ("Generation", ["teacher_nll", "valid_python", "distinct_1", "distinct_2"]),
    ("Speed", ["generate_tokens_per_s_batch1", "generate_tokens_per_s_batched", "forward_tokens_per_s"]),
    ("As the teacher's draft (speculative sampling, measured)",
     ["spec_acceptance_measured", "spec_acceptance_expected", "spec_acceptance_z", "spec_tokens_per_step",
      "spec_teacher_tokens_per_s", "spec_assisted_tokens_per_s", "spec_speedup"]),
]
PERCENT = {"top1_accuracy", "top1_agreement", "aligned_top1_agreement", "aligned_token_share", "valid_python",
           "draft_acceptance", "spec_acceptance_measured", "spec_acceptance_expected"}
ARROWS = {"min": "↓", "max": "↑"}
CLASS_PERCENT = {"accuracy", "macro_f1", "teacher_agreement", "accuracy_share",  # classification reports
                 "neighbour_agreement", "neighbour_overlap_10", "knn_accuracy", "knn_accuracy_share"}  # and encoders'


# ---------------------------------------------------------------------------------------------
# Files


def write_report(results: dict, out_dir, *, runs: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Write ``eval.json`` (``results`` as JSON) and ``report.html`` into ``out_dir``.

    ``runs`` (name -> training output directory) adds loss curves from each run's
    ``metrics.jsonl``: training ``loss`` and evaluation ``eval/ce`` over ``step``.
    Returns (path of eval.json, path of report.html).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {name: read_run_metrics(path) for name, path in (runs or {}).items()}
    json_path = _write_atomic(out / "eval.json", json.dumps(_finite(results), indent=2, allow_nan=False) + "\n")
    html_path = _write_atomic(out / "report.html", render_html(results, curves))
    return json_path, html_path


def read_run_metrics(run_dir) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (unreadable lines skipped); UserError if missing."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"run {run_dir}: no metrics.jsonl there (give a `distill train` output directory)")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def _write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _finite(value):
    """JSON has no NaN or infinity: such floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Values and colors


def model_colors(names) -> dict[str, str]:
    colors, i = {}, 0
    for name in names:
        if name == "teacher":
            colors[name] = TEACHER_COLOR
        else:
            colors[name] = PALETTE[i % len(PALETTE)]
            i += 1
    return colors


def format_value(key: str, value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return NONFINITE
    if key == "params":
        return _si(value)
    if key == "dim":
        return f"{value:,}"
    if key == "size_mb":
        return f"{value:.1f} MB" if value >= 10 else f"{value:.3g} MB"
    if key in PERCENT or key in CLASS_PERCENT:
        return f"{100 * value:.1f}%"
    if key.startswith("latency_ms"):
        return f"{value:.2f} ms"
    if key in ("latency_ratio", "size_ratio"):
        return f"{value:.2f}×"
    if key == "examples_per_s":
        return f"{value:,.0f}"
    if key in ("draft_expected_tokens", "spec_tokens_per_step"):
        return f"{value:.2f}"
    if "tokens_per_s" in key:
        return f"{value:,.0f}"
    if key == "perplexity":
        return f"{value:.2f}" if value < 1000 else f"{value:,.0f}"
    if key in ("distinct_1", "distinct_2"):
        return f"{value:.3f}"
    if key == "spec_acceptance_z":
        return f"{value:+.2f}"
    if key == "spec_speedup":
        return f"{value:.2f}×"
    return f"{value:.4f}"


def cell_text(metrics: dict, key: str) -> str:
    """One model's ``key`` as a table shows it: NONFINITE for a metric its (or the teacher's)
    non-finite outputs left uncomputed, "—" for one that does not apply, else the number."""
    if key in metrics.get("nonfinite_metrics", ()):
        return NONFINITE
    return format_value(key, metrics.get(key))


def shown_keys(results: dict, keys) -> list[str]:
    """The metric keys some model has a value for, or lacks because of non-finite outputs."""
    models = results["models"].values()
    return [k for k in keys if any(m.get(k) is not None or k in m.get("nonfinite_metrics", ()) for m in models)]


def nonfinite_warnings(results: dict) -> list[str]:
    """One line per model whose outputs were non-finite: its name and its ``status``."""
    return [f"model {name!r}: {m.get('status', 'non-finite outputs')}"
            for name, m in results["models"].items() if m.get("finite") is False]


def _si(n) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def best_models(results: dict, key: str) -> set[str]:
    """The models with the best value of ``key`` among the students (all models if there is no
    teacher); empty if the metric has no better direction, fewer than two models have it, or all
    have the same value."""
    direction = task_metrics(results).get(key, (None, None, None))[1]
    models = results["models"]
    pool = {n: m.get(key) for n, m in models.items() if n != "teacher" or len(models) == 1}
    pool = {n: v for n, v in pool.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if direction is None or len(pool) < 2 or len(set(pool.values())) == 1:
        return set()  # nothing to choose between
    best = (min if direction == "min" else max)(pool.values())
    return {n for n, v in pool.items() if v == best}


def machine_chips(results: dict) -> list[tuple[str, str]]:
    """The header's machine and date chips of a classifier or encoder report."""
    s, machine = results.get("settings", {}), results.get("machine", {})
    chips = []
    if machine:
        chips.append(("machine", f"{machine.get('device', '')}, {machine.get('cpu_count', '?')} CPUs, "
                                 f"{s.get('threads', '?')} threads, torch {machine.get('torch', '?')}"))
    if machine.get("date"):
        chips.append(("date", machine["date"].replace("T", " ").replace("+00:00", " UTC")))
    return chips


def task_metrics(results: dict) -> dict:
    """The labels, directions and descriptions of the metrics of ``results``' task."""
    task = results.get("task")
    if task == "classification":
        from distill.evaluate_classify import CLASS_METRICS

        return CLASS_METRICS
    if task == "embedding":
        from distill.evaluate_embed import EMBED_METRICS

        return EMBED_METRICS
    from distill.evaluate import METRICS

    return METRICS


def _esc(text) -> str:
    return html.escape(str(text)).replace("://", "&#58;//")


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot, no global state)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=144, metadata={"Software": None})  # fixed size: the grid lines up
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _style(ax, title: str) -> None:
    ax.set_title(title, fontsize=10.5, loc="left", color="#111827", pad=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#d1d5db")
    ax.tick_params(colors="#374151", labelsize=8.5)
    ax.grid(axis="y", color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)


def bar_chart(results: dict, key: str, colors: dict[str, str], metrics: Optional[dict] = None) -> Optional[str]:
    """One metric, one bar per model that has it; None if no model has it. ``metrics``: the labels
    and directions (default ``distill.evaluate.METRICS``)."""
    from matplotlib.figure import Figure

    from distill.evaluate import METRICS

    label, direction, _ = (metrics or METRICS)[key]
    values = {n: m.get(key) for n, m in results["models"].items()}
    values = {n: v for n, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if not values:
        return None
    percent = PERCENT | CLASS_PERCENT
    scale = 100.0 if key in percent else 1.0
    fig = Figure(figsize=(3.9, 2.7), layout="constrained")
    ax = fig.add_subplot()
    names = list(values)
    heights = [values[n] * scale for n in names]
    bars = ax.bar(range(len(names)), heights, color=[colors[n] for n in names], width=0.62)
    for bar, name in zip(bars, names):
        if name == "teacher":
            bar.set_hatch("///")
            bar.set_edgecolor("white")
    top = 100.0 if key in percent else (max(heights) if max(heights) > 0 else 1.0)
    for bar, name in zip(bars, names):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + top * 0.02,
                format_value(key, values[name]), ha="center", va="bottom", fontsize=8, color="#111827")
    ax.set_ylim(0, 112 if key in percent else top * 1.18)  # fractions on their whole 0-100% scale
    ax.set_xticks(range(len(names)), names, fontsize=8.5)
    _style(ax, f"{label}  {ARROWS.get(direction, '')}")
    if key in percent:
        ax.set_yticks([0, 25, 50, 75, 100])
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0f}%")
    return _png(fig)


def speed_chart(results: dict, colors: dict[str, str]) -> Optional[str]:
    """Generation tokens/s at batch 1 and batched, grouped per model."""
    from matplotlib.figure import Figure

    keys = [("generate_tokens_per_s_batch1", "batch 1"), ("generate_tokens_per_s_batched", "batched")]
    models = {n: m for n, m in results["models"].items() if all(_finite_number(m.get(k)) for k, _ in keys)}
    if not models:
        return None
    fig = Figure(figsize=(3.9, 2.7), layout="constrained")
    ax = fig.add_subplot()
    width = 0.38
    names = list(models)
    top = max(models[n][k] for n in names for k, _ in keys) or 1.0
    for j, (key, _) in enumerate(keys):
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        heights = [models[n][key] for n in names]
        bars = ax.bar(xs, heights, width=width * 0.94, color=[colors[n] for n in names],
                      alpha=0.55 if j == 0 else 1.0)
        for bar, h in zip(bars, heights):
            ax.text(bar.get_x() + bar.get_width() / 2, h + top * 0.02, f"{h:,.0f}", ha="center", va="bottom",
                    fontsize=7, color="#111827")
    ax.set_ylim(0, top * 1.2)
    ax.set_xticks(range(len(names)), names, fontsize=8.5)
    batch = results.get("settings", {}).get("batch_size", "")
    _style(ax, f"generation tokens/s ↑  (light: batch 1, dark: {batch})")
    return _png(fig)


def curves_chart(curves: dict[str, list[dict]], colors: dict[str, str], *, eval_key: str = "eval/ce",
                 eval_title: str = "eval cross-entropy (nats per token)",
                 train_title: str = "training loss (per token)") -> Optional[str]:
    """Training loss and an eval metric (``eval_key``) over steps, one line per run."""
    from matplotlib.figure import Figure

    if not curves:
        return None
    fig = Figure(figsize=(10.5, 3.3), layout="constrained")
    ax_train, ax_eval = fig.subplots(1, 2)
    extra = iter(PALETTE[::-1])
    any_eval = False
    for name, records in curves.items():
        color = colors.get(name) or next(extra, "#111827")
        train = [(r["step"], r["loss"]) for r in records if _finite_number(r.get("loss"))]
        evals = [(r["step"], r[eval_key]) for r in records if _finite_number(r.get(eval_key))]
        if train:
            xs, ys = zip(*train)
            if len(ys) >= 30:  # noisy: raw in light, an exponential moving average on top
                ax_train.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ax_train.plot(xs, _ema(ys, 0.9), color=color, linewidth=1.8, label=name)
            else:
                ax_train.plot(xs, ys, color=color, linewidth=1.6, label=name)
        if evals:
            any_eval = True
            xs, ys = zip(*evals)
            ax_eval.plot(xs, ys, color=color, linewidth=1.6, marker="o", markersize=3.5, label=name)
    _style(ax_train, train_title)
    _style(ax_eval, eval_title)
    for ax in (ax_train, ax_eval):
        ax.set_xlabel("optimizer step", fontsize=8.5, color="#374151")
        ax.grid(axis="x", color="#f3f4f6", linewidth=0.8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize=8.5)
    if not any_eval:
        ax_eval.text(0.5, 0.5, f"no {eval_key} records", ha="center", va="center", transform=ax_eval.transAxes,
                     color="#6b7280", fontsize=9)
    return _png(fig)


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ema(values, decay: float) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else decay * avg + (1 - decay) * v
        out.append(avg)
    return out


# ---------------------------------------------------------------------------------------------
# HTML

CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f6f7f9;color:#1f2937;font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",
Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 28px 48px}
header h1{font-size:24px;margin:0 0 4px;color:#111827;letter-spacing:-.01em}
header .sub{color:#4b5563;margin:0}
header .meta{display:flex;flex-wrap:wrap;gap:8px;margin-top:12px}
.chip{background:#fff;border:1px solid #e5e7eb;border-radius:999px;padding:2px 10px;font-size:12.5px;color:#374151}
.chip b{color:#111827;font-weight:600}
section{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:20px 22px;margin-top:22px}
h2{font-size:17px;margin:0 0 4px;color:#111827}
.note{color:#6b7280;font-size:12.5px;margin:0 0 14px}
table.summary{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
.summary th,.summary td{padding:6px 12px;border-bottom:1px solid #f0f1f3;text-align:right;white-space:nowrap}
.summary th:first-child,.summary td:first-child{text-align:left;white-space:normal}
.summary thead th{font-size:13px;color:#111827;border-bottom:2px solid #e5e7eb;vertical-align:bottom}
.summary tr.group td{background:#f9fafb;color:#6b7280;font-size:11.5px;font-weight:600;text-transform:uppercase;
letter-spacing:.05em;padding-top:9px}
.summary td.metric .dir{color:#9ca3af;font-size:12px;margin-left:4px}
.summary td.metric .desc{display:block;color:#9ca3af;font-size:11.5px}
.summary td.ref,.summary th.ref{background:#f9fafb;color:#4b5563}
.summary td.best{background:#ecfdf5;color:#065f46;font-weight:700}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:baseline}
.tag{display:block;font-size:10.5px;font-weight:500;color:#9ca3af;text-transform:uppercase;letter-spacing:.05em}
.charts{display:grid;grid-template-columns:repeat(3,1fr);gap:14px}
.charts figure,.curves figure{margin:0}
.charts img,.curves img{width:100%;height:auto;display:block}
.sample{border:1px solid #e5e7eb;border-radius:8px;margin-top:16px;overflow:hidden}
.sample .head{background:#f9fafb;padding:6px 12px;font-size:12.5px;color:#4b5563;border-bottom:1px solid #e5e7eb}
pre{margin:0;font:12px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;
white-space:pre-wrap;overflow-wrap:anywhere}
.prompt pre{padding:10px 12px;background:#fbfbfc;color:#374151;border-bottom:1px solid #e5e7eb}
.completions{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr))}
.completion{border-right:1px solid #f0f1f3;min-width:0}
.completion:last-child{border-right:none}
.completion .who{padding:6px 12px;font-size:12.5px;font-weight:600;border-bottom:1px solid #f0f1f3}
.completion pre{padding:8px 12px;color:#111827}
.completion .ctx{color:#9ca3af}
dl.defs{display:grid;grid-template-columns:230px 1fr;gap:6px 16px;margin:0;font-size:13px}
dl.defs dt{font-weight:600;color:#111827}
dl.defs dd{margin:0;color:#4b5563}
.kv{display:grid;grid-template-columns:1fr 1fr;gap:22px;margin-top:16px}
.kv table{border-collapse:collapse;width:100%;font-size:12.5px}
.kv td{padding:3px 8px;border-bottom:1px solid #f3f4f6;vertical-align:top;overflow-wrap:anywhere}
.kv td:first-child{color:#6b7280;white-space:nowrap;width:34%}
h3{font-size:13.5px;margin:18px 0 6px;color:#111827}
footer{color:#9ca3af;font-size:12px;margin-top:18px;text-align:center}
section.alert{background:#fef2f2;border-color:#fecaca}
section.alert h2{color:#991b1b}
section.alert ul{margin:0;padding-left:20px;color:#7f1d1d}
.badge{display:block;font-size:10.5px;font-weight:600;color:#b91c1c;text-transform:uppercase;letter-spacing:.05em}
.summary td.nonfinite,.nf{color:#b91c1c;font-style:italic}
"""

DEFINITIONS = [
    ("perplexity, eval cross-entropy",
     "Mean negative log-likelihood (nats) of each next token of the data, packed into blocks of max_length "
     "tokens (position t predicts token t+1, as in training); perplexity is its exponential."),
    ("next-token top-1 accuracy", "How often the model's most likely next token is the actual next token."),
    ("calibration error (ECE)",
     "Expected calibration error of the top-1 prediction: predictions are put into 15 equal-width bins by "
     "confidence (the probability of the top-1 token; bin m holds confidences in ((m−1)/15, m/15]), and "
     "ECE = Σ (bin size / N) · |accuracy in bin − mean confidence in bin|. 0 is perfectly calibrated."),
    ("agreement, forward / reverse KL",
     "Against the teacher on the same tokens, at temperature 1: how often the top-1 tokens agree, "
     "KL(p_teacher‖q_model) (mode-covering: penalizes missing what the teacher thinks likely) and "
     "KL(q_model‖p_teacher) (mode-seeking: penalizes putting mass where the teacher puts little)."),
    ("teacher NLL of generations",
     "Each model samples one completion per prompt (temperature 1, top-p 1, same seed); the teacher scores it: "
     "mean negative log-likelihood per completion token (a sampled end-of-text token included). "
     "How plausible the teacher finds the model's own text; perplexity can rank models differently."),
    ("valid Python",
     "Prompt + completion, cut where the function ends (the first completion line indented at or left of the "
     "def), dedented, must parse with ast. A function still open when the completion stops counts as valid if "
     "the parser finds no error so far (an incomplete program, checked with codeop, after dropping an "
     "unfinished last line if needed). A completion that adds no body line counts as invalid. Nothing is run."),
    ("distinct-1, distinct-2",
     "Distinct tokens (token bigrams) divided by all tokens (bigrams) over every completion: diversity. "
     "Neither direction is better; compare with the teacher."),
    ("draft acceptance α, tokens per teacher step",
     "For speculative sampling with this model drafting for the teacher (Leviathan et al. 2023): α is the mean "
     "over the data's positions of Σ min(p_teacher, q_model) = 1 − TVD, the chance a drafted token is accepted; "
     "with γ = 4 drafts per step the teacher then makes (1 − α^(γ+1)) / (1 − α) tokens per forward."),
    ("as the teacher's draft (measured)",
     "The teacher samples from the first prompts alone and with this model as its assistant (Hugging Face "
     "assisted generation, 4 drafts per step, same seeds, batch 1). Measured acceptance = accepted / judged "
     "drafts (a step judges its drafts up to the first rejection); the expected value on those same positions "
     "is the mean of Σ min(p, q) there, and z = (accepted − expected) / √Σ α(1 − α) is within ±3 when the two "
     "agree. Speedup = assisted ÷ alone tokens per second: a draft pays off only when its forward is much "
     "cheaper than the teacher's and α is high."),
    ("speed",
     "Sampled tokens per second at batch 1 and batched (left padding, exactly max_new_tokens per row), and "
     "tokens per second through a full forward pass, each timed after a warm-up. Measurements on this "
     "machine under its load at the time, not properties of the model."),
]


def render_html(results: dict, curves: dict[str, list[dict]] | None = None) -> str:
    """The whole report as one HTML string (see the module docstring for what self-contained means)."""
    curves = curves or {}
    if results.get("task") == "classification":
        from distill.report_classify import render_classification

        return render_classification(results, curves)
    if results.get("task") == "embedding":
        from distill.report_embed import render_embedding

        return render_embedding(results, curves)
    names = list(results["models"])
    colors = model_colors(list(names) + [n for n in curves if n not in names])
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>distill eval: {_esc(', '.join(names))}</title><style>{CSS}</style></head><body><main>",
             _header(results, names, colors),
             _alert(results),
             _summary(results, names, colors),
             _charts(results, colors),
             _curves(curves, colors),
             _samples(results, names, colors),
             _details(results),
             "<footer>written by distill eval</footer></main></body></html>\n"]
    return "".join(p for p in parts if p)


def _header(results: dict, names: list[str], colors: dict[str, str]) -> str:
    s = results.get("settings", {})
    machine = results.get("machine", {})
    tokens = next((m.get("eval_tokens") for m in results["models"].values() if m.get("eval_tokens")), None)
    chips = [("data", results.get("data", ""))]
    if tokens:
        chips.append(("tokens scored", f"{tokens:,}"))
    if s.get("prompts_found") is not None:
        kind = "Python functions" if s.get("prompt_mode") == "python" else "document openings"
        chips.append(("prompts", f"{s['prompts_found']} {kind}, {s.get('max_new_tokens')} new tokens"))
    if machine:
        chips.append(("machine", f"{machine.get('device', '')}, {machine.get('cpu_count', '?')} CPUs, "
                                 f"torch {machine.get('torch', '?')}"))
    if machine.get("date"):
        chips.append(("date", machine["date"].replace("T", " ").replace("+00:00", " UTC")))
    models = ", ".join(f"<span class='swatch' style='background:{colors[n]}'></span>{_esc(n)}" for n in names)
    sub = ("Teacher and students on the same data: quality, fidelity to the teacher, the text they write, speed."
           if "teacher" in names else "Models on the same data: quality, the text they write, speed.")
    chip_html = "".join(f"<span class='chip'>{_esc(k)}: <b>{_esc(v)}</b></span>" for k, v in chips)
    return (f"<header><h1>distill eval report</h1><p class='sub'>{sub}</p>"
            f"<div class='meta'><span class='chip'>models: {models}</span>{chip_html}</div></header>")


def _nonfinite_models(results: dict) -> list[str]:
    return [n for n, m in results["models"].items() if m.get("finite") is False]


def _alert(results: dict) -> str:
    bad = _nonfinite_models(results)
    if not bad:
        return ""
    items = "".join(f"<li><b>{_esc(n)}</b>: {_esc(results['models'][n].get('status', ''))}</li>" for n in bad)
    return (f"<section class='alert' id='non-finite'><h2>Non-finite outputs</h2><p class='note'>These models produced "
            f"NaN or infinite logits. The metrics made from such outputs are not computed: their cells read "
            f"<span class='nf'>{NONFINITE}</span>, and those bars are left out of the charts.</p><ul>{items}</ul></section>")


def _summary(results: dict, names: list[str], colors: dict[str, str], groups: Optional[list] = None,
             metrics: Optional[dict] = None) -> str:
    from distill.evaluate import METRICS

    METRICS = metrics or METRICS  # noqa: N806
    models = results["models"]
    bad = set(_nonfinite_models(results))
    head = "".join(
        f"<th class='{'ref' if n == 'teacher' else ''}'>"
        f"{'<span class=tag>reference</span>' if n == 'teacher' else ''}"
        f"{f'<span class=badge>{NONFINITE}</span>' if n in bad else ''}"
        f"<span class='swatch' style='background:{colors[n]}'></span>{_esc(n)}</th>" for n in names)
    rows = []
    for title, keys in groups or GROUPS:
        keys = shown_keys(results, keys)
        if not keys:
            continue
        rows.append(f"<tr class='group'><td colspan='{len(names) + 1}'>{_esc(title)}</td></tr>")
        for key in keys:
            label, direction, desc = METRICS[key]
            arrow = ARROWS.get(direction, "")
            best = best_models(results, key)
            cells = []
            for n in names:
                classes = ["ref"] if n == "teacher" else []
                if n in best:
                    classes.append("best")
                text = cell_text(models[n], key)
                if text == NONFINITE:
                    classes.append("nonfinite")
                cells.append(f"<td class='{' '.join(classes)}'>{_esc(text)}</td>")
            rows.append(f"<tr><td class='metric'>{_esc(label)}<span class='dir'>{arrow}</span>"
                        f"<span class='desc'>{_esc(desc)}</span></td>{''.join(cells)}</tr>")
    note = ("↓ lower is better, ↑ higher is better; the best student on each row is highlighted; the teacher "
            "is the reference." if "teacher" in names else
            "↓ lower is better, ↑ higher is better; the best model on each row is highlighted.")
    return (f"<section><h2>Summary</h2><p class='note'>{note}</p><table class='summary'><thead><tr><th>metric</th>"
            f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _charts(results: dict, colors: dict[str, str]) -> str:
    images = [bar_chart(results, key, colors) for key in
              ("perplexity", "bits_per_byte", "top1_accuracy", "top1_agreement", "forward_kl", "reverse_kl",
               "aligned_forward_kl", "teacher_nll", "valid_python")]
    images += [speed_chart(results, colors), bar_chart(results, "forward_tokens_per_s", colors)]
    figures = "".join(f"<figure><img alt='chart' src='{src}'></figure>" for src in images if src)
    if not figures:
        return ""
    bad = _nonfinite_models(results)
    left_out = (f" Left out of the charts of the metrics they lack (non-finite outputs): {_esc(', '.join(bad))}."
                if bad else "")
    return (f"<section><h2>Metrics side by side</h2><p class='note'>↓ lower is better, ↑ higher is better; "
            f"hatched bars: the teacher, for reference. Perplexity alone can misjudge an objective: a "
            f"mode-seeking (reverse-KL) student may lose on perplexity while writing text the teacher finds "
            f"more plausible.{left_out}</p>"
            f"<div class='charts'>{figures}</div></section>")


def _curves(curves: dict[str, list[dict]], colors: dict[str, str], **chart) -> str:
    """The training-curves section; ``chart``: curves_chart's eval_key / titles (default eval CE)."""
    src = curves_chart(curves, colors, **chart)
    if src is None:
        return ""
    what = chart.get("eval_title", "eval cross-entropy").split(" (")[0]
    return (f"<section class='curves' id='loss-curves'><h2>Training curves</h2><p class='note'>From each run's "
            f"metrics.jsonl: {_esc(', '.join(curves))}. The training loss is the run's own objective "
            f"(runs with other objectives are not on the same scale); {_esc(what)} is comparable "
            f"when the runs share eval data.</p><figure><img alt='loss curves' src='{src}'></figure></section>")


def _samples(results: dict, names: list[str], colors: dict[str, str]) -> str:
    samples = results.get("samples") or []
    if not samples:
        return ""
    settings = results.get("settings", {})
    blocks = []
    for i, sample in enumerate(samples[:MAX_SAMPLES], 1):
        columns = []
        for n in names:
            text = sample.get("completions", {}).get(n)
            if text is None:
                continue
            body = _esc(text[1:] if text.startswith("\n") else text) or "<span class='ctx'>(empty)</span>"
            columns.append(f"<div class='completion'><div class='who' style='color:{colors[n]}'>"
                           f"<span class='swatch' style='background:{colors[n]}'></span>{_esc(n)}</div>"
                           f"<pre>{body}</pre></div>")
        source = f" · {_esc(sample['source'])}" if sample.get("source") else ""
        blocks.append(f"<div class='sample'><div class='head'>prompt {i}{source}</div>"
                      f"<div class='prompt'><pre>{_esc(sample['prompt'])}</pre></div>"
                      f"<div class='completions'>{''.join(columns)}</div></div>")
    shown = min(len(samples), MAX_SAMPLES)
    silent = [n for n in _nonfinite_models(results) if not any(n in s.get("completions", {}) for s in samples)]
    silent_note = (f" No completions from {_esc(', '.join(silent))}: non-finite outputs." if silent else "")
    return (f"<section><h2>Samples</h2><p class='note'>{shown} of {len(samples)} prompts, each continued by every "
            f"model (one sample, temperature 1, seed {_esc(settings.get('seed', ''))}, at most "
            f"{_esc(settings.get('max_new_tokens', ''))} tokens). All completions are in eval.json.{silent_note}</p>"
            f"{''.join(blocks)}</section>")


def _details(results: dict) -> str:
    defs = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in DEFINITIONS)
    settings = {k: v for k, v in results.get("settings", {}).items() if k != "models"}
    paths = {n: m.get("path", "") for n, m in results["models"].items()}

    def table(d):
        rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(_plain(v))}</td></tr>" for k, v in d.items())
        return f"<table>{rows}</table>"

    return (f"<section><h2>How the numbers are measured</h2><dl class='defs'>{defs}</dl><div class='kv'>"
            f"<div><h3>Settings</h3>{table(settings)}</div><div><h3>Models</h3>{table(paths)}"
            f"<h3>Machine</h3>{table(results.get('machine', {}))}</div></div></section>")


def _plain(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items())
    return "—" if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# Generated data


GENERATED_ROWS = (("rows", "training rows", "{:,}"), ("prompts", "prompts with a kept row", "{:,}"),
                  ("kept_fraction", "samples kept", "{:.1%}"), ("completion_tokens_mean", "completion tokens, mean", "{:.1f}"),
                  ("completion_tokens_p50", "completion tokens, median", "{:.0f}"),
                  ("completion_tokens_p95", "completion tokens, p95", "{:.0f}"),
                  ("unfinished_fraction", "cut by max_new_tokens", "{:.1%}"),
                  ("distinct_completions", "distinct completions", "{:.1%}"), ("distinct_2", "distinct-2", "{:.3f}"),
                  ("verification_rate", "verified (CoT)", "{:.1%}"), ("unparseable_rate", "no answer (CoT)", "{:.1%}"),
                  ("teacher_nll", "teacher NLL per token", "{:.3f}"))


def generated_table(result: dict) -> list[tuple[str, str]]:
    """(label, formatted value) of every measured quantity of ``evaluate_generated``'s result."""
    return [(label, fmt.format(result[key])) for key, label, fmt in GENERATED_ROWS if result.get(key) is not None]


def write_generated_report(result: dict, out_dir) -> tuple[Path, Path]:
    """``generated.json`` and a self-contained ``generated.html`` (table + length and teacher-NLL histograms)."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = _write_atomic(out / "generated.json", json.dumps(result, indent=2, default=_plain) + "\n")
    charts = []
    for key, title, xlabel in (("lengths", "Completion length", "tokens"),
                               ("row_nll", "Teacher NLL per row", "nats per token")):
        values = result.get(key)
        if not values:
            continue
        fig = Figure(figsize=(5.2, 3.0))
        ax = fig.add_subplot()
        ax.hist(values, bins=min(40, max(5, len(values) // 5)), color="#2563eb", alpha=0.85)
        _style(ax, title)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("rows", fontsize=9)
        fig.tight_layout()
        charts.append(f"<figure><img alt='{_esc(title)}' src='{_png(fig)}'></figure>")
    rows = "".join(f"<tr><th>{_esc(label)}</th><td>{_esc(value)}</td></tr>" for label, value in generated_table(result))
    teacher = result["teacher_of_data"]
    source = teacher.get("model") if teacher.get("kind") == "local" else f"{teacher.get('url')} ({teacher.get('model')})"
    body = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>distill eval: generated data"
            f"</title><style>{CSS}</style></head><body><main><h1>Generated data</h1>"
            f"<p>{_esc(result['folder'])}, written by {_esc(source)}"
            + (f"; scored by the teacher {_esc(result['teacher'])}" if result.get("teacher") else "") + "</p>"
            f"<table>{rows}</table><div class='charts'>{''.join(charts)}</div>"
            "<footer>written by distill eval --generated</footer></main></body></html>\n")
    html_path = _write_atomic(out / "generated.html", body)
    return json_path, html_path
