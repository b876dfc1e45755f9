"""Where the time of a cross-tokenizer training step goes, next to a same-tokenizer KD step.

    python benchmarks/cross_tokenizer_profile.py --bench runs/xtok-bench

The quickstart student (its embedding sized to each tokenizer) and the bundled teacher, on the same
micro-batch of training text (16 rows of 256 tokens, bf16 autocast as the quickstart trains),
forward + backward of ``distill.training.micro_batch_loss``, as the loop runs it:

- ``same-kd``: the teacher's tokenizer, forward KL, kd 0.5 + ce 0.5 (the chunked, fused LM-head loss);
- ``x-exact`` / ``x-hybrid`` / ``x-hybrid-exact-uld``: the 4k BPE of ``benchmarks/cross_tokenizer.py``
  (``--bench``: its output folder, for the tokenizer), exact-match only, exact + ULD over the 256
  largest probabilities per side (what the benchmark trains), and exact + ULD with the full sort.

Each arm is timed over ``--steps`` steps after two warm-up steps (median per step), then profiled
with ``torch.profiler`` over the same steps: the table gives the operators with the most CPU time
(self time, summed over those steps) and the alignment's share (``align_s`` of the teacher
source). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import models  # noqa: E402
from distill.data import load_tokenized  # noqa: E402
from distill.quickstart import CORPUS, STUDENT_ARCH, TEACHER  # noqa: E402
from distill.teachers import LiveTeacher  # noqa: E402
from distill.teachers.cross import Aligner, CrossTokenizerTeacher  # noqa: E402
from distill.training import Backbone, LossSettings, micro_batch_loss  # noqa: E402

ARMS = {
    "same-kd": None,
    "x-exact": dict(exact_weight=1.0, uld_weight=0.0, uld_tokens="auto", exact_mode="renormalized", uld_top_k=0),
    "x-hybrid": dict(exact_weight=1.0, uld_weight=1.0, uld_tokens="auto", exact_mode="renormalized", uld_top_k=256),
    "x-hybrid-exact-uld": dict(exact_weight=1.0, uld_weight=1.0, uld_tokens="auto", exact_mode="renormalized",
                               uld_top_k=0),
}


def batch_of(tokenizer, rows: int, length: int) -> dict:
    data = load_tokenized(str(CORPUS / "train.parquet"), tokenizer=tokenizer, format="text", packing=True,
                          max_length=length, max_examples=40)
    ids = torch.tensor(data[:rows]["input_ids"])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", type=Path, default=Path("runs/xtok-bench"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = models.freeze(models.load_causal_lm(str(TEACHER)))
    t_tok = models.load_tokenizer(str(TEACHER))
    s_tok = models.load_tokenizer(str(args.bench / "tokenizer"))
    summary, tables = [], {}
    for arm, cross in ARMS.items():
        tok = t_tok if cross is None else s_tok
        student = Backbone(models.student_from_config(dict(STUDENT_ARCH), vocab_size=len(tok)))
        batch = batch_of(tok, args.rows, args.length)
        settings = LossSettings(divergence="forward_kl", divergence_kwargs={}, temperature=1.0, scale_by_tau2=True,
                                kd_weight=0.5, ce_weight=0.5, chunk_size=256, vocab_size=len(tok))
        if cross is None:
            source = LiveTeacher(teacher, len(tok), chunk_size=256)
        else:
            aligner = Aligner(t_tok, s_tok, max_teacher_length=teacher.config.max_position_embeddings)
            source = CrossTokenizerTeacher(teacher, aligner, len(t_tok), chunk_size=256)
            settings.cross = dict(cross, teacher_ids=torch.tensor(aligner.teacher_ids),
                                  student_ids=torch.tensor(aligner.student_ids))

        def step():
            student.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                parts, _ = micro_batch_loss(student, source, batch, settings)
            parts.loss.backward()

        for _ in range(2):
            step()
        times = []
        align0 = getattr(source, "align_seconds", 0.0)
        for _ in range(args.steps):
            tic = time.perf_counter()
            step()
            times.append(time.perf_counter() - tic)
        align = (getattr(source, "align_seconds", 0.0) - align0) / args.steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        tables[arm] = [(e.key, e.self_cpu_time_total / total, e.count // args.steps) for e in events[:args.top]]
        summary.append((arm, statistics.median(times), align, int((batch["labels"] != -100).sum())))
        print(f"{arm}: {statistics.median(times) * 1e3:.0f} ms/step", flush=True)

    base = summary[0][1]
    print(f"\n{args.rows} rows x {args.length} tokens, bf16 autocast, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| arm | ms / step (median) | vs same-kd | alignment ms (share) |")
    print("|---|---|---|---|")
    for arm, t, align, _ in summary:
        print(f"| {arm} | {t * 1e3:.0f} | {t / base:.2f}x | {align * 1e3:.0f} ({align / t:.1%}) |")
    for arm, rows in tables.items():
        print(f"\n**{arm}**: operators by self CPU time\n")
        print("| operator | share | calls / step |")
        print("|---|---|---|")
        for key, share, calls in rows:
            print(f"| `{key}` | {share:.1%} | {calls} |")


if __name__ == "__main__":
    main()
