"""Feature-level distillation losses: hidden states, attention maps, attention relations, and the
relations between examples. Pure functions for encoders and causal LMs alike.

Conventions (as for the token-level divergences in ``divergences.py``):

- Each loss returns **per-position** (or per-example) values, float32, and never divides by a batch
  count. The caller sums the kept positions and the loop divides once by the global count. Masked
  positions get 0.
- Direction: KL terms are KL(teacher ‖ student), the teacher's distribution is the target, as in
  TinyBERT and MiniLM.
- Attention tensors are **probabilities** (what Hugging Face models return with
  ``output_attentions=True``), (B, H, T, T): query rows, key columns; a padded key has probability 0.
- Width mismatches go through a learned ``FeatureProjection`` (student width -> teacher width). It
  is trained with the student and is not part of the saved student.

Layer maps: ``uniform_layer_map(L_S, L_T)`` maps student layer i to teacher layer
⌈(i + 1)·L_T / L_S⌉ − 1, so the last student layer meets the last teacher layer.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HIDDEN_KINDS = ("mse", "cosine")
HEAD_MODES = ("match", "average")
POOLING = ("mean", "cls")
_MASKED = -1e9  # a masked key's relation score: finite, so no 0 · ∞ in values or gradients
_TINY = 1e-12  # floor of a student probability inside a log (an exact 0 where the teacher has mass is infinite KL)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer for each student layer: i -> ⌈(i + 1)·L_T / L_S⌉ − 1 (0-based)."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got {student_layers} and {teacher_layers}")
    return [-(-(i + 1) * teacher_layers // student_layers) - 1 for i in range(student_layers)]


def check_layer_map(layer_map: Sequence[int], student_layers: int, teacher_layers: int) -> list[int]:
    """An explicit map (one teacher layer per student layer, or -1 for none), checked."""
    layer_map = list(layer_map)
    if len(layer_map) != student_layers:
        raise ValueError(f"the layer map has {len(layer_map)} entries but the student has {student_layers} layers")
    bad = [t for t in layer_map if not -1 <= t < teacher_layers]
    if bad:
        raise ValueError(f"teacher layers {bad} are outside 0..{teacher_layers - 1} (-1: no teacher layer)")
    return layer_map


class FeatureProjection(nn.Module):
    """A learned linear map from the student's width to the teacher's (FitNets' regressor); the
    identity when the widths are equal and ``force`` is False."""

    def __init__(self, student_width: int, teacher_width: int, *, force: bool = False):
        super().__init__()
        self.linear = (nn.Linear(student_width, teacher_width, bias=False)
                       if force or student_width != teacher_width else None)

    def forward(self, x: Tensor) -> Tensor:
        return x if self.linear is None else self.linear(x.to(self.linear.weight.dtype))


def hidden_state_loss(student: Tensor, teacher: Tensor, *, kind: str = "mse",
                      projection: Optional[nn.Module] = None) -> Tensor:
    """FitNets / TinyBERT hidden-state distillation, per position.

    mse: mean over features of (W·h_s − h_t)²; cosine: 1 − cos(W·h_s, h_t).

    Shapes:
        student: (..., d_s);  teacher: (..., d_t);  returns: (...) float32
    """
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"kind must be one of {HIDDEN_KINDS}, got {kind!r}")
    s = (projection(student) if projection is not None else student).float()  # (..., d_t)
    t = teacher.float().detach()
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"widths differ ({s.shape[-1]} vs {t.shape[-1]}): give a FeatureProjection")
    if kind == "mse":
        return (s - t).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)


def _heads(student: Tensor, teacher: Tensor, heads: str) -> tuple[Tensor, Tensor]:
    """Both sides with the same number of heads: as they are ("match"), or each averaged ("average")."""
    if heads not in HEAD_MODES:
        raise ValueError(f"heads must be one of {HEAD_MODES}, got {heads!r}")
    if heads == "average":
        return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(f"the student has {student.shape[1]} attention heads and the teacher {teacher.shape[1]}: "
                         "use heads='average' or attention relations, which need no equal head count")
    return student, teacher


def attention_kl(student_attn: Tensor, teacher_attn: Tensor, mask: Optional[Tensor] = None, *,
                 heads: str = "match") -> Tensor:
    """TinyBERT / MiniLM attention-map distillation: KL(teacher ‖ student) between the attention
    distributions of each query position, averaged over heads (``heads``: "match" pairs head h with
    head h; "average" compares the head-averaged maps, for different head counts).

    Shapes:
        student_attn: (B, H_s, T, T);  teacher_attn: (B, H_t, T, T) probabilities;
        mask: (B, T) bool, the real query positions (None: all);  returns: (B, T) float32
    """
    q, p = _heads(student_attn.float(), teacher_attn.float().detach(), heads)  # (B, H, T, T)
    kl = (torch.xlogy(p, p) - p * q.clamp_min(_TINY).log()).sum(-1).mean(1)  # (B, T)
    return kl if mask is None else torch.where(mask, kl, 0.0)


def relation_kl(student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None, *,
                relation_heads: int, causal: bool = False) -> Tensor:
    """MiniLM v2 self-attention relation distillation for one kind of vector (queries, keys or
    values): each side's vectors are split into ``relation_heads`` heads, the relation of head a is
    softmax(x_a·x_aᵀ / √d_a) over the (unmasked) key positions, and the loss is KL(teacher ‖ student)
    per query position, averaged over the relation heads. Widths and attention-head counts may
    differ; the widths must divide by ``relation_heads``. ``causal``: query i relates only to keys
    j <= i, as a decoder's attention does.

    Shapes:
        student: (B, T, d_s);  teacher: (B, T, d_t);  mask: (B, T) bool (None: all);
        returns: (B, T) float32
    """
    def relations(x: Tensor) -> Tensor:
        B, T, d = x.shape
        if d % relation_heads:
            raise ValueError(f"width {d} does not divide into {relation_heads} relation heads")
        xa = x.float().view(B, T, relation_heads, d // relation_heads).transpose(1, 2)  # (B, A, T, d_a)
        scores = xa @ xa.transpose(-1, -2) / math.sqrt(d // relation_heads)  # (B, A, T, T)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], _MASKED)  # exp underflows to exactly 0
        if causal:
            later = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # (T, T): key after query
            scores = scores.masked_fill(later, _MASKED)
        return torch.log_softmax(scores, -1)

    log_q, log_p = relations(student), relations(teacher.detach())  # (B, A, T, T)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1).mean(1)  # (B, T); a masked key: p = 0 times a finite log
    return kl if mask is None else torch.where(mask, kl, 0.0)


def pool(hidden: Tensor, mask: Optional[Tensor] = None, *, pooling: str = "mean") -> Tensor:
    """Sentence embeddings: the mean over real positions, or the first position ("cls").

    Shapes: hidden (B, T, d), mask (B, T) bool -> (B, d)"""
    if pooling not in POOLING:
        raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
    if pooling == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def embedding_loss(student: Tensor, teacher: Tensor, *, kind: str = "cosine",
                   projection: Optional[nn.Module] = None) -> Tensor:
    """Embedding-model distillation per example: 1 − cos(W·e_s, e_t) ("cosine") or the mean
    squared difference ("mse"), as ``hidden_state_loss`` on pooled vectors.

    Shapes: student (N, d_s), teacher (N, d_t) -> (N,) float32"""
    return hidden_state_loss(student, teacher, kind="mse" if kind == "mse" else "cosine", projection=projection)


def similarity_matrix_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """The batch's cosine-similarity structure: row i of the loss is the mean over j of
    (cos(e_s,i, e_s,j) − cos(e_t,i, e_t,j))². Widths may differ (no projection needed).

    Shapes: student (N, d_s), teacher (N, d_t) -> (N,) float32"""
    def gram(x: Tensor) -> Tensor:
        x = F.normalize(x.float(), dim=-1, eps=1e-8)
        return x @ x.T  # (N, N)

    return (gram(student) - gram(teacher.detach())).pow(2).mean(-1)


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance loss (Park et al. 2019), per anchor example: the Huber loss (smooth L1, δ = 1)
    between the pairwise distances of each side, each normalized by its mean over distinct pairs,
    averaged over the other examples j ≠ i.

    Shapes: student (N, d_s), teacher (N, d_t), N >= 2 -> (N,) float32"""
    n = student.shape[0]
    if n < 2:
        raise ValueError("RKD needs at least 2 examples per batch")
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)

    def distances(x: Tensor) -> Tensor:
        x = x.float()
        d = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1).clamp_min(1e-12).sqrt() * off  # (N, N), 0 diagonal
        return d / d[off].mean().clamp_min(1e-12)

    with torch.no_grad():
        t = distances(teacher)
    s = distances(student)
    return (F.smooth_l1_loss(s, t, reduction="none") * off).sum(-1) / (n - 1)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle loss, per anchor example j: the Huber loss between the cosines of the angles
    ∠(e_i, e_j, e_k) of each side (unit vectors from e_j to e_i and to e_k), averaged over the
    pairs i, k ≠ j.

    Shapes: student (N, d_s), teacher (N, d_t), N >= 3 -> (N,) float32"""
    n = student.shape[0]
    if n < 3:
        raise ValueError("the RKD angle loss needs at least 3 examples per batch")
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    keep = off[:, :, None] & off[:, None, :]  # (N_j, N_i, N_k): i ≠ j and k ≠ j

    def angles(x: Tensor) -> Tensor:
        x = x.float()
        v = F.normalize(x[None, :, :] - x[:, None, :], dim=-1, eps=1e-12)  # (N_j, N_i, d): e_i − e_j
        return v @ v.transpose(1, 2)  # (N_j, N_i, N_k)

    with torch.no_grad():
        t = angles(teacher)
    s = angles(student)
    return (F.smooth_l1_loss(s, t, reduction="none") * keep).sum((1, 2)) / ((n - 1) ** 2)
