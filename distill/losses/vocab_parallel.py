"""The chunked objective with the LM heads split by vocabulary across processes (a per-shard loss).

Under FSDP2 or ZeRO-3 each process holds rows [lo, hi) of every LM head (dim-0 sharding is a
slice of the vocabulary). ``chunked_kd_loss`` needs the whole head, so it is gathered once per
micro-batch. This loss does not gather the heads: each process gathers the *hidden states* of all
processes' tokens instead, computes the logits of its own slice of the vocabulary for all of them,
and the processes agree on the normalizers (a max and a sum of exponentials per row, all-reduced).
Every divergence in ``divergences`` is a sum over the vocabulary of terms in (log q_v, log p_v)
(``divergence_sum``): each process sums the terms of its slice, and the sum of the slices is the
divergence. CE's target logit lives on one process. The gradients are computed during the forward
pass, chunk by chunk, as in ``chunked_kd_loss``: the head slice's gradient is complete on its
process (every token was seen there), the hidden states' gradient is summed over the processes and
each keeps its own rows (reduce-scatter).

What moves between processes per micro-batch: gathering the head moves (V × d) weights in and
(V × d) gradients out; this loss moves (processes × tokens × d) hidden states in and their
gradients out, plus 3 to 5 all-reduces of a few floats per row and chunk. Which is cheaper
depends on tokens per step against vocabulary size: BENCHMARKS.md measures both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distill.losses.chunked import DEFAULT_CHUNK_SIZE, chunk_slices, stored_grads_scaled
from distill.losses.divergences import divergence_sum
from distill.losses.objective import LossParts, weighted


def vocab_slice(vocab_size: int, rank: int, world: int) -> slice:
    """Rows of a (vocab_size, d) head that process ``rank`` of ``world`` holds under dim-0 sharding.

    The split of ``torch.chunk`` (FSDP2's and DeepSpeed's): ceil(V / world) rows each, the last
    processes fewer or none."""
    per = -(-vocab_size // world)
    return slice(min(rank * per, vocab_size), min((rank + 1) * per, vocab_size))


class _SumOverProcesses(torch.autograd.Function):
    """Σ over the processes of ``x``; backward sums the incoming gradients over the processes (right for
    a quantity every process goes on to use: each adds the gradient of its own use of it)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _Group:
    """The processes that share the vocabulary; with one process every collective is the identity."""

    def __init__(self, group: Any = None):
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        self.group = group
        self.size = dist.get_world_size(group) if self.on else 1
        self.rank = dist.get_rank(group) if self.on else 0

    def max_(self, x: Tensor) -> Tensor:
        if self.on:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def sum_(self, x: Tensor) -> Tensor:
        if self.on:
            dist.all_reduce(x, group=self.group)
        return x

    def sum_differentiable(self, x: Tensor) -> Tensor:
        return _SumOverProcesses.apply(x, self.group) if self.on else x

    def gather_rows(self, x: Tensor, rows: int, fill: float | int = 0) -> Tensor:
        """(n, ...) on each process -> (size × rows, ...), process r's rows at [r·rows, r·rows + n)."""
        padded = x.new_full((rows, *x.shape[1:]), fill)
        padded[: x.shape[0]] = x
        if not self.on:
            return padded
        out = x.new_empty((self.size * rows, *x.shape[1:]))
        dist.all_gather_single(out, padded.contiguous(), group=self.group)
        return out

    def scatter_rows(self, x: Tensor, n: int) -> Tensor:
        """(size × rows, ...) on each process -> the sum over processes of this process's block, first n rows."""
        rows = x.shape[0] // self.size
        if not self.on:
            return x[:n]
        out = x.new_empty((rows, *x.shape[1:]))
        dist.reduce_scatter_single(out, x.contiguous(), group=self.group)
        return out[:n]


def _log_softmax(logits: Tensor, temperature: float, group: _Group) -> Tensor:
    """log softmax(logits / τ) over the whole vocabulary, from this process's columns of it; float32.

    Differentiable: the normalizer's gradient reaches every process's columns."""
    z = logits.float()  # (C, V_r)
    if temperature != 1.0:
        z = z / temperature
    top = group.max_(z.detach().amax(-1) if z.shape[-1] else z.new_full(z.shape[:1], -torch.inf))  # (C,)
    top = top.masked_fill(torch.isinf(top), 0.0)  # a row banned everywhere stays -inf, never NaN
    total = group.sum_differentiable((z - top[:, None]).exp().sum(-1))  # (C,)
    return z - (top + total.log())[:, None]  # (C, V_r)


def _chunk_step(
    rows: slice,
    hidden: Tensor,
    weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    labels: Tensor,
    vocab: slice,
    group: _Group,
    grads: tuple[Tensor | None, Tensor | None],
    settings: dict[str, Any],
) -> Tensor:
    """One chunk of the gathered rows: adds its gradients into ``grads`` (hidden rows, head slice) and
    returns the (2, C) per-row [kd, ce] of this process's vocabulary slice (summed over processes
    by the caller)."""
    grad_hidden, grad_weight = grads
    temperature, kd_weight, ce_weight = settings["temperature"], settings["kd_weight"], settings["ce_weight"]
    chunk_hidden = hidden[rows].to(weight.dtype)  # (C, d)
    chunk_labels = labels[rows]  # (C,)
    mask = chunk_labels != settings["ignore_index"]  # (C,)
    logits = (chunk_hidden @ weight.T).requires_grad_()  # (C, V_r), a leaf of its own graph
    zero = logits.new_zeros(logits.shape[:1], dtype=torch.float32)  # (C,)
    grad_on = grad_hidden is not None or grad_weight is not None
    with torch.enable_grad():
        kd_grad = grad_on and kd_weight != 0 and teacher_hidden is not None
        with torch.set_grad_enabled(grad_on and ce_weight != 0 or kd_grad and temperature == 1.0):
            log_q1 = _log_softmax(logits, 1.0, group)  # (C, V_r), CE's (at temperature 1), and KD's at τ = 1
            owned = mask & (chunk_labels >= vocab.start) & (chunk_labels < vocab.stop)  # (C,)
            local = (chunk_labels - vocab.start).clamp(0, max(logits.shape[1] - 1, 0))  # (C,)
            picked = log_q1.gather(1, local[:, None])[:, 0] if logits.shape[1] else zero  # (C,)
            ce = torch.where(owned, -picked, 0.0)  # (C,)
        kd = zero
        if teacher_hidden is not None:
            with torch.no_grad():
                teacher_logits = teacher_hidden[rows].to(teacher_weight.dtype) @ teacher_weight.T  # (C, V_r)
                log_p = _log_softmax(teacher_logits, temperature, group)  # (C, V_r)
            with torch.set_grad_enabled(kd_grad):
                log_q = log_q1 if temperature == 1.0 else _log_softmax(logits, temperature, group)  # (C, V_r)
                kd = torch.where(mask, settings["terms"](log_q, log_p, **settings["params"]), 0.0)  # (C,)
        loss = weighted(kd.sum(), ce.sum(), **settings["weights"])
    if grad_on and loss.requires_grad:  # every process takes this branch: its backward all-reduces
        (grad_logits,) = torch.autograd.grad(loss, logits)  # (C, V_r)
        if grad_hidden is not None:
            grad_hidden[rows] = grad_logits @ weight  # (C, d), this slice's share
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.T.to(grad_weight.dtype), chunk_hidden.to(grad_weight.dtype))  # (V_r, d)
    return torch.stack([kd.detach(), ce.detach()])  # (2, C)


class _VocabParallelKD(torch.autograd.Function):
    """Forward: the loss over this process's tokens and the stored gradients. Backward: them × grad_output."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, labels, teacher_hidden, teacher_weight, vocab, group,
                matmul_dtype, chunk_size, settings):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n = student_hidden.shape[0]
        rows = int(group.max_(torch.tensor([n], device=student_hidden.device))[0])  # the longest process's rows
        hidden = group.gather_rows(student_hidden.detach(), rows)  # (P·R, d)
        all_labels = group.gather_rows(labels, rows, settings["ignore_index"])  # (P·R,)
        t_hidden = None if teacher_hidden is None else group.gather_rows(teacher_hidden.detach(), rows)  # (P·R, d_t)
        weight = student_weight.detach().to(matmul_dtype)  # (V_r, d)
        t_weight = None if teacher_weight is None else teacher_weight.detach().to(matmul_dtype)  # (V_r, d_t)
        grads = (
            torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None,  # (P·R, d)
            torch.zeros_like(student_weight, dtype=torch.float32) if need_weight else None,  # (V_r, d)
        )
        per_row = []
        with torch.autocast(student_hidden.device.type, enabled=False):  # matmul dtype is explicit; loss math float32
            for chunk in chunk_slices(hidden.shape[0], chunk_size):
                per_row.append(_chunk_step(chunk, hidden, weight, t_hidden, t_weight, all_labels, vocab, group,
                                           grads, settings))
        mine = slice(group.rank * rows, group.rank * rows + n)
        kd, ce = group.sum_(torch.cat(per_row, dim=1))[:, mine].sum(1).unbind()  # this process's rows, whole vocabulary
        kd, ce = kd.clone(), ce.clone()
        loss = weighted(kd, ce, **settings["weights"])
        num_supervised = (labels != settings["ignore_index"]).sum()
        grad_hidden, grad_weight = grads
        ctx.grads = [
            None if grad_hidden is None else group.scatter_rows(grad_hidden, n).to(student_hidden.dtype),
            None if grad_weight is None else grad_weight.to(student_weight.dtype),
        ]
        ctx.mark_non_differentiable(kd, ce, num_supervised)
        return loss, kd, ce, num_supervised

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        return (*stored_grads_scaled(ctx, grad_loss, "vocab_parallel_kd_loss"), None, None, None, None, None, None,
                None, None)


def vocab_parallel_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    *,
    vocab_size: int,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    scale_by_tau2: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    group: Any = None,
    **divergence_kwargs: float,
) -> LossParts:
    """``chunked_kd_loss`` of this process's tokens, with each process holding one slice of the heads.

    Every process of ``group`` (default: all) calls it at the same time, with its own tokens
    (``student_hidden``, ``labels``, ``teacher_hidden``: any number of rows, 0 included) and its
    rows ``vocab_slice(vocab_size, rank, world)`` of the student's and the teacher's heads (real
    vocabulary only: padding rows dropped; no biases). It returns this process's sums, the same
    values ``chunked_kd_loss`` gives on its tokens with the whole heads. Gradients: the hidden
    states get exactly that loss's gradient; the head slice gets the gradient of the sum of all
    processes' losses (already reduced: do not all-reduce or reduce-scatter it again; scale it as
    the other parameters' averaged gradients are scaled). ``backward`` must run on every process
    or none (the loss itself is computed in forward; backward only scales). ``chunk_size`` counts
    rows of all processes' tokens together. Under ``torch.autocast`` the matmuls run in the
    autocast dtype; the loss math is float32. With one process (or no process group) it is the
    chunked loss on the whole vocabulary.

    Shapes:
        student_hidden: (N, d_s)     student_weight: (V_r, d_s), rows [lo, hi) of the student's head
        teacher_hidden: (N, d_t)     teacher_weight: (V_r, d_t), the same rows of the teacher's head
        labels: (N,), aligned with the rows (already shifted)
        returns: LossParts of scalars (this process's sums; the caller divides once)
    """
    terms = divergence_sum(divergence)
    terms(torch.zeros(1, 1), torch.zeros(1, 1), **divergence_kwargs)  # bad parameters fail here, on every process
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("teacher_hidden and teacher_weight go together")
    if teacher_hidden is None and kd_weight != 0:
        raise ValueError("no teacher but kd_weight != 0; pass teacher_hidden + teacher_weight or set kd_weight=0")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = student_hidden.shape[0]
    if student_hidden.dim() != 2 or labels.shape != (n,) or (teacher_hidden is not None and teacher_hidden.shape[0] != n):
        raise ValueError(f"expected student_hidden (N, d), labels (N,), teacher_hidden (N, d_t); got "
                         f"{tuple(student_hidden.shape)}, {tuple(labels.shape)}"
                         f"{'' if teacher_hidden is None else ', ' + str(tuple(teacher_hidden.shape))}")
    processes = _Group(group)
    vocab = vocab_slice(vocab_size, processes.rank, processes.size)
    widths = [student_weight.shape[0]] + ([] if teacher_weight is None else [teacher_weight.shape[0]])
    if any(w != vocab.stop - vocab.start for w in widths):
        raise ValueError(f"process {processes.rank} of {processes.size} holds head rows {vocab.start}:{vocab.stop} "
                         f"of the {vocab_size}-token vocabulary; got head slices of {widths} rows")
    device_type = student_hidden.device.type
    matmul_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else student_weight.dtype
    weights = dict(kd_weight=kd_weight, ce_weight=ce_weight, temperature=temperature, scale_by_tau2=scale_by_tau2)
    settings = dict(terms=terms, params=divergence_kwargs, weights=weights, ignore_index=ignore_index, **weights)
    loss, kd, ce, num_supervised = _VocabParallelKD.apply(
        student_hidden, student_weight, labels, teacher_hidden, teacher_weight, vocab, processes, matmul_dtype,
        chunk_size, settings,
    )
    return LossParts(loss=loss, kd=kd, ce=ce, num_supervised=num_supervised)
