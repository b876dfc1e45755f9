"""distill.distiller: the plain-module API on models that are not transformers (values against the
formula written out in float64, gradients, feature hooks and projections, what is and is not
trained or saved, errors)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill.distiller import Distiller, FeatureMatch


class Fixed(nn.Module):
    """A "model" whose output is its parameter: the logits themselves."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32).clone())

    def forward(self, x):
        return self.logits


def test_classification_kd_equals_hintons_formula_on_a_hand_example():
    s = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
    t = [[3.0, -1.0, 0.0], [-2.0, 1.0, 2.5]]
    y = torch.tensor([0, 2])
    tau, a, b = 2.0, 0.7, 0.3
    student = Fixed(s)
    out = Distiller(student, Fixed(t), temperature=tau, kd_weight=a, ce_weight=b)(torch.zeros(2), y)

    def formula(sl):
        kl, ce = 0.0, 0.0
        for i in range(2):
            zs = [v / tau for v in sl[i]]
            zt = [v / tau for v in t[i]]
            ls = [v - math.log(sum(math.exp(u) for u in zs)) for v in zs]
            lt = [v - math.log(sum(math.exp(u) for u in zt)) for v in zt]
            kl += sum(math.exp(p) * (p - q) for p, q in zip(lt, ls))
            ce -= sl[i][y[i]] - math.log(sum(math.exp(u) for u in sl[i]))
        return a * tau ** 2 * kl / 2 + b * ce / 2, kl / 2, ce / 2

    loss, kl, ce = formula(s)
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    assert out.kd.item() == pytest.approx(kl, rel=1e-6) and out.ce.item() == pytest.approx(ce, rel=1e-6)
    out.loss.backward()
    eps, numeric = 1e-6, torch.zeros(2, 3, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            up = [row[:] for row in s]
            down = [row[:] for row in s]
            up[i][j] += eps
            down[i][j] -= eps
            numeric[i, j] = (formula(up)[0] - formula(down)[0]) / (2 * eps)
    torch.testing.assert_close(student.logits.grad.double(), numeric, rtol=1e-4, atol=1e-6)


def test_sequence_logits_leave_ignored_positions_out_and_sum_reduction_is_the_sum():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 3:] = -100
    d = Distiller(Fixed(s), Fixed(t), divergence="jsd", beta=0.3, temperature=1.5, kd_weight=1.0, ce_weight=0.5)
    mean, total = d(None, labels), d(None, labels, reduction="sum")
    keep = labels != -100
    assert mean.num_rows == int(keep.sum()) == 8
    assert total.loss.item() == pytest.approx(mean.loss.item() * 8, rel=1e-6)
    kept = Distiller(Fixed(s[keep]), Fixed(t[keep]), divergence="jsd", beta=0.3, temperature=1.5, kd_weight=1.0,
                     ce_weight=0.5)(None, labels[keep])
    assert mean.loss.item() == pytest.approx(kept.loss.item(), rel=1e-6)


def mlp(widths):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def test_features_train_a_projection_that_is_neither_the_students_nor_the_teachers():
    torch.manual_seed(0)
    teacher, student = mlp([6, 40, 40, 5]), mlp([6, 8, 5])
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(256, 6)
    y = teacher(x).argmax(-1)
    match = FeatureMatch("1", "3", kind="cosine", weight=2.0)  # the tanh outputs: 8 wide vs 40 wide
    d = Distiller(student, teacher, temperature=2.0, kd_weight=1.0, ce_weight=0.2, features=[match], example=x[:3])
    assert (match.student_width, match.teacher_width) == (8, 40)
    proj = d.projections["0"].linear
    assert proj.weight.shape == (40, 8)
    names = {n for n, _ in d.named_parameters()}
    assert any(n.startswith("projections.") for n in names) and not any("teacher" in n for n in names)
    assert len(list(d.parameters())) == len(list(student.parameters())) + 1
    assert set(student.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # no projection in it
    assert not any(k.startswith("_teacher") for k in d.state_dict())
    w0 = proj.weight.detach().clone()
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    history = d.fit(loader, torch.optim.Adam(d.parameters(), lr=1e-2), epochs=15, progress=False)
    assert len(history) == 15 * 8 and all(math.isfinite(h["loss"]) for h in history)
    first = sum(h["feature/1->3"] for h in history[:8])
    last = sum(h["feature/1->3"] for h in history[-8:])
    assert last < 0.7 * first and history[-1]["kd"] < history[0]["kd"]
    assert not torch.equal(proj.weight, w0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), k  # the teacher is never updated
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        agree = (student(x).argmax(-1) == y).float().mean().item()
    assert agree > 0.8


def test_dict_batches_and_feature_masks():
    class Tagger(nn.Module):  # a tiny sequence model fed by keyword arguments
        def __init__(self, width):
            super().__init__()
            self.embed = nn.Embedding(20, width)
            self.out = nn.Linear(width, 7)

        def forward(self, input_ids, attention_mask):
            return self.out(self.embed(input_ids))

    torch.manual_seed(0)
    teacher, student = Tagger(16), Tagger(4)
    ids = torch.randint(0, 20, (3, 5))
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    d = Distiller(student, teacher, kd_weight=1.0, ce_weight=0.0, features=[FeatureMatch("embed", "embed")],
                  example={"input_ids": ids, "attention_mask": attn})
    batch = {"input_ids": ids, "attention_mask": attn}
    full, masked = d(batch), d(batch, mask=attn)
    s_feat = d.projections["0"](student.embed(ids))
    per = (s_feat - teacher.embed(ids)).pow(2).mean(-1)
    assert masked.features["embed->embed"].item() == pytest.approx(per[attn].mean().item(), rel=1e-5)
    assert full.features["embed->embed"].item() == pytest.approx(per.mean().item(), rel=1e-5)
    assert full.ce is None  # no labels: no CE to report


def test_errors_name_the_problem():
    teacher, student = mlp([4, 6, 3]), mlp([4, 5, 3])
    with pytest.raises(ValueError, match="no submodule 'blocks.9'.*some it has"):
        Distiller(student, teacher, features=[FeatureMatch("blocks.9", "0")], example=torch.randn(2, 4))
    with pytest.raises(ValueError, match="example="):
        Distiller(student, teacher, features=[FeatureMatch("0", "0")])
    with pytest.raises(ValueError, match="kind"):
        Distiller(student, teacher, features=[FeatureMatch("0", "0", kind="l3", student_width=5, teacher_width=6)])
    with pytest.raises(ValueError, match="needs labels"):
        Distiller(student, teacher, ce_weight=0.5)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="outputs"):
        Distiller(mlp([4, 5, 2]), teacher, ce_weight=0.0)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="divergence"):
        Distiller(student, teacher, divergence="kl_typo")


def test_the_mlp_example_runs_and_distillation_beats_ce_on_its_task():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "python" / "mlp_distillation.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    acc = {m[0]: float(m[1]) for m in re.findall(r"\| (ce|kd|kd\+hidden) \| 0 \| ([\d.]+)% \|", result.stdout)}
    assert set(acc) == {"ce", "kd", "kd+hidden"}, result.stdout
    assert acc["kd"] > acc["ce"] + 5  # soft targets on the unlabelled transfer set
