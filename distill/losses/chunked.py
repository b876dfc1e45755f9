"""The chunked form of ``kd_loss``: LM head fused with the objective, walked over the tokens in chunks.

A (tokens × V) float32 logits tensor is 4·N·V bytes (2 GiB at 4k tokens × 128k vocab) and the
dense objective holds several. ``chunked_kd_loss`` takes the student's last hidden states and LM
head (and the teacher's, or its logits), and for one chunk of rows at a time computes the logits,
the objective (by calling the dense ``kd_loss``: the math exists once) and its gradient with respect
to those logits, which it folds straight into the gradients of the hidden states, head weight and
bias. No more than one chunk of logits (the teacher's included) is alive at any time. The gradients
are computed during the forward pass (the Liger-Kernel approach); ``backward`` only scales them by
the incoming gradient.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distill.losses.divergences import get_divergence
from distill.losses.objective import LossParts, kd_loss
from distill.losses.sparse import SparseTargets, sparse_kd_loss

# Rows per chunk, chosen with benchmarks/loss_memory.py (BENCHMARKS.md): on CPU, 256 rows were as
# fast as or faster than 1024 and than the dense path, at a fraction of the memory. Peak memory
# above the inputs is about 7 · chunk_size · V · 4 bytes plus the head's gradient.
DEFAULT_CHUNK_SIZE = 256


def chunk_slices(num_rows: int, chunk_size: int) -> list[slice]:
    """Row ranges [0, c), [c, 2c), ... covering ``num_rows``; the last one may be shorter.

    The one place chunk boundaries are decided (the loss and its tests both use it)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]


@dataclass
class _Teacher:
    """The teacher's targets: precomputed logits, hidden states and LM head to make them per chunk,
    or sparse (top-k / sampled) targets. Already sliced to the shared vocabulary, detached, and
    (hidden/head) cast to the matmul dtype."""

    logits: Tensor | None = None  # (N, V)
    hidden: Tensor | None = None  # (N, d_t)
    weight: Tensor | None = None  # (V, d_t)
    bias: Tensor | None = None  # (V,)
    sparse: SparseTargets | None = None  # (N, k)

    def logits_for(self, rows: slice) -> Tensor | None:
        if self.logits is not None:
            return self.logits[rows]  # (C, V)
        if self.hidden is not None:
            return _linear(self.hidden[rows].to(self.weight.dtype), self.weight, self.bias)  # (C, V)
        return None


def _linear(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """hidden @ weight.T (+ bias): (C, d) × (V, d) -> (C, V)."""
    if bias is None:
        return hidden @ weight.T
    return torch.addmm(bias, hidden, weight.T)


def _add_matmul_(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, accumulated in out's dtype (in place, without an (a @ b) temporary when dtypes match)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a @ b)


@functools.lru_cache(maxsize=64)
def _compiled_objective(loss_items: tuple):
    """``(logits, teacher_logits, labels) -> (d loss / d logits, (loss, kd, ce, num_supervised))`` for
    ``kd_loss`` with these keyword arguments, under ``torch.compile``: the log-softmaxes, the
    divergence, the CE and their backward become a few fused kernels over the (C, V) chunk instead of
    one pass (and one (C, V) temporary) per operation. One compiled function per set of arguments."""
    kwargs = dict(loss_items)

    def objective(logits: Tensor, teacher_logits: Tensor | None, labels: Tensor):
        parts = kd_loss(logits, teacher_logits, labels, **kwargs)
        return parts.loss, (parts.kd, parts.ce, parts.num_supervised)

    # Default dynamic-shape policy: full chunks and the first shorter last chunk compile static; a second
    # last-chunk size recompiles once with the row count symbolic, and every later size reuses that.
    return torch.compile(torch.func.grad_and_value(objective, has_aux=True))


def _chunk_step(
    rows: slice,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: _Teacher,
    labels: Tensor,
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    loss_kwargs: dict[str, Any],
    compiled: bool = False,
) -> LossParts:
    """Objective of one chunk of rows; adds its gradients into ``grads`` (hidden, weight, bias).

    A function of its own so every (C, V) tensor is freed when it returns, before the next chunk."""
    grad_hidden, grad_weight, grad_bias = grads
    vocab = weight.shape[0]
    chunk_hidden = hidden[rows].to(weight.dtype)  # (C, d)
    teacher_logits = teacher.logits_for(rows)  # (C, V) or None
    logits = _linear(chunk_hidden, weight, bias)  # (C, V)
    trainable = loss_kwargs["kd_weight"] != 0 or loss_kwargs["ce_weight"] != 0
    if compiled and teacher.sparse is None and trainable:
        objective = _compiled_objective(tuple(sorted(loss_kwargs.items())))
        grad_logits, (loss, (kd, ce, num_supervised)) = objective(logits, teacher_logits, labels[rows])  # (C, V), ...
        parts = LossParts(loss, kd, ce, num_supervised)
    else:
        logits.requires_grad_()  # a leaf of its own graph
        with torch.enable_grad():
            if teacher.sparse is not None:
                parts = sparse_kd_loss(logits, teacher.sparse[rows], labels[rows], **loss_kwargs)
            else:
                parts = kd_loss(logits, teacher_logits, labels[rows], **loss_kwargs)
        if not parts.loss.requires_grad:  # both weights 0: nothing to differentiate
            return parts
        (grad_logits,) = torch.autograd.grad(parts.loss, logits)  # (C, V)
    if grad_hidden is not None:
        grad_hidden[rows] = grad_logits @ weight  # (C, d)
    if grad_weight is not None:
        _add_matmul_(grad_weight[:vocab], grad_logits.T, chunk_hidden)  # (V, d)
    if grad_bias is not None:
        grad_bias[:vocab] += grad_logits.sum(0, dtype=torch.float32)  # (V,)
    return LossParts(parts.loss.detach(), parts.kd, parts.ce, parts.num_supervised)


class _ChunkedKD(torch.autograd.Function):
    """Forward: loss over all chunks and the stored gradients. Backward: stored gradients × grad_output."""

    @staticmethod
    def forward(
        ctx, student_hidden, student_weight, student_bias, labels, teacher, vocab_size, matmul_dtype, chunk_size,
        loss_kwargs, compiled,
    ):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # Gradients accumulate in float32 at the inputs' full shapes; rows past vocab_size stay 0.
        grads = (
            torch.zeros_like(student_hidden, dtype=torch.float32) if need_hidden else None,  # (N, d)
            torch.zeros_like(student_weight, dtype=torch.float32) if need_weight else None,  # (V_s, d)
            torch.zeros_like(student_bias, dtype=torch.float32) if need_bias else None,  # (V_s,)
        )
        weight = student_weight[:vocab_size].to(matmul_dtype)  # (V, d)
        bias = None if student_bias is None else student_bias[:vocab_size].to(matmul_dtype)  # (V,)

        device = student_hidden.device
        loss, kd, ce = (torch.zeros((), dtype=torch.float32, device=device) for _ in range(3))
        num_supervised = torch.zeros((), dtype=torch.int64, device=device)
        with torch.autocast(device.type, enabled=False):  # matmul dtype is explicit; loss math is float32
            for rows in chunk_slices(student_hidden.shape[0], chunk_size):
                parts = _chunk_step(rows, student_hidden, weight, bias, teacher, labels, grads, loss_kwargs, compiled)
                loss += parts.loss
                kd += parts.kd
                ce += parts.ce
                num_supervised += parts.num_supervised

        inputs = (student_hidden, student_weight, student_bias)
        ctx.grads = [None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs)]
        ctx.mark_non_differentiable(kd, ce, num_supervised)
        return loss, kd, ce, num_supervised

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        return (*stored_grads_scaled(ctx, grad_loss, "chunked_kd_loss"), None, None, None, None, None, None, None)


def stored_grads_scaled(ctx, grad_loss: Tensor, name: str) -> list:
    """The gradients a loss's forward computed (``ctx.grads``), scaled in place by ``grad_loss`` and handed
    over (no second copy of the head-sized gradient); a second backward is an error."""
    if ctx.grads is None:
        raise RuntimeError(f"{name}: backward runs once per forward (retain_graph is not supported)")
    grads, ctx.grads = ctx.grads, None
    return [None if g is None else g.mul_(grad_loss) for g in grads]


def chunked_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_targets: SparseTargets | None = None,
    sparse_mode: str = "tail",
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    scale_by_tau2: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    vocab_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    compiled: bool = False,
    **divergence_kwargs: float,
) -> LossParts:
    """``kd_loss`` on ``student_hidden @ student_weight.T (+ student_bias)``, one chunk of rows at a time.

    Same values and gradients as building both logits tensors and calling ``kd_loss`` (same
    arguments, same meaning), without holding more than ``chunk_size`` rows of logits. The teacher
    is given either as ``teacher_logits`` or as ``teacher_hidden`` + ``teacher_weight`` (+ bias), or
    not at all when ``kd_weight == 0``; it never receives gradients. Or as ``teacher_targets``,
    sparse top-k / sampled targets aligned with the rows: the divergence is then the sparse forward
    KL (``divergence`` must be ``forward_kl``) in ``sparse_mode`` (see ``sparse_kd_loss``).
    ``vocab_size`` is the real shared vocabulary: columns past it (LM-head padding) are dropped on
    both sides (default: the narrower of the two heads). Under ``torch.autocast`` the matmuls run in
    the autocast dtype and the loss math in float32. ``compiled=True`` runs each chunk's objective and its
    gradient under ``torch.compile`` (same values to float32 rounding; the first calls compile, once per
    argument set and once more when a last chunk's size first differs; sparse targets stay eager). ``loss`` carries the gradient (``.backward()`` once, like any loss);
    ``kd``, ``ce`` and ``num_supervised`` are detached, for logging.

    Shapes:
        student_hidden: (N, d_s)          student_weight: (V_s, d_s)    student_bias: (V_s,)
        teacher_logits: (N, V_t)    or    teacher_hidden: (N, d_t), teacher_weight: (V_t, d_t), teacher_bias: (V_t,)
                                    or    teacher_targets: ids, logprobs (N, k), log_tail (N,)
        labels: (N,), aligned with the rows (a causal LM's caller has already shifted them)
        returns: LossParts of scalars (sums over supervised rows; the caller divides once)
    """
    get_divergence(divergence)  # unknown names fail here, not in the first chunk
    if teacher_logits is not None and (teacher_hidden is not None or teacher_weight is not None):
        raise ValueError("give the teacher as teacher_logits or as teacher_hidden + teacher_weight, not both")
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("teacher_hidden and teacher_weight go together")
    if teacher_targets is not None and (teacher_logits is not None or teacher_hidden is not None):
        raise ValueError("give the teacher as logits, hidden states or sparse targets, not several")
    if teacher_targets is not None and (divergence != "forward_kl" or divergence_kwargs):
        raise ValueError(f"sparse teacher targets support divergence 'forward_kl' only, got {divergence!r}")
    num_rows = student_hidden.shape[0]
    if student_hidden.dim() != 2 or labels.shape != (num_rows,):
        raise ValueError(
            f"expected student_hidden (N, d) and labels (N,); got {tuple(student_hidden.shape)} and "
            f"{tuple(labels.shape)} (flatten batch and time first)"
        )

    widths = [student_weight.shape[0]]
    if teacher_logits is not None:
        widths.append(teacher_logits.shape[-1])
    if teacher_weight is not None:
        widths.append(teacher_weight.shape[0])
    if vocab_size is None:
        vocab_size = min(widths)
    if not 0 < vocab_size <= min(widths):
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {min(widths)}] (LM-head widths {widths})")

    device_type = student_hidden.device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    matmul_dtype = torch.get_autocast_dtype(device_type) if autocast_on else student_weight.dtype

    teacher = _Teacher()
    if teacher_logits is not None:
        teacher.logits = teacher_logits.detach()[:, :vocab_size]  # (N, V)
    elif teacher_hidden is not None:
        teacher_dtype = matmul_dtype if autocast_on else teacher_weight.dtype
        teacher.hidden = teacher_hidden.detach()  # (N, d_t)
        teacher.weight = teacher_weight.detach()[:vocab_size].to(teacher_dtype)  # (V, d_t)
        if teacher_bias is not None:
            teacher.bias = teacher_bias.detach()[:vocab_size].to(teacher_dtype)  # (V,)

    loss_kwargs = dict(
        temperature=temperature,
        scale_by_tau2=scale_by_tau2,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        ignore_index=ignore_index,
    )
    if teacher_targets is not None:
        teacher.sparse = teacher_targets
        loss_kwargs.update(mode=sparse_mode)
    else:
        loss_kwargs.update(divergence=divergence, **divergence_kwargs)
    loss, kd, ce, num_supervised = _ChunkedKD.apply(
        student_hidden, student_weight, student_bias, labels, teacher, vocab_size, matmul_dtype, chunk_size,
        loss_kwargs, compiled,
    )
    return LossParts(loss=loss, kd=kd, ce=ce, num_supervised=num_supervised)
