"""Distillation for any pair of ``torch.nn.Module`` s that map a batch to logits: vision, tabular, an
MLP, a classifier. A user calls it inside their own loop, or hands it a DataLoader.

    from distill.distiller import Distiller, FeatureMatch

    distiller = Distiller(student, teacher, temperature=4.0, kd_weight=0.9, ce_weight=0.1,
                          features=[FeatureMatch("blocks.1", "blocks.3", weight=1.0)], example=x0)
    optimizer = torch.optim.AdamW(distiller.parameters(), lr=1e-3)  # student + projections, never the teacher
    for x, y in loader:
        out = distiller(x, y)            # out.loss, out.kd, out.ce, out.features
        out.loss.backward(); optimizer.step(); optimizer.zero_grad()

The loss math is ``distill.losses``: the logits objective is ``kd_loss`` (any registered
divergence, temperature with τ² scaling, the KD / CE weights), the feature terms are
``distill.losses.features.hidden_state_loss`` on the outputs of the named submodules, captured with
forward hooks. Where the widths differ, a learned ``FeatureProjection`` maps the student's to the
teacher's; it lives in the Distiller (``distiller.projections``), is trained with the student, and
is not part of the student's ``state_dict``. The teacher is frozen, in eval mode, runs under
``torch.no_grad``, and is not a registered submodule (``distiller.parameters()`` and
``distiller.state_dict()`` leave it out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from distill.losses import get_divergence, kd_loss
from distill.losses.features import HIDDEN_KINDS, FeatureProjection, hidden_state_loss


@dataclass
class FeatureMatch:
    """Match the output of the student's submodule ``student`` (a name from ``named_modules()``) to
    the teacher's ``teacher``, with ``hidden_state_loss`` of ``kind`` ("mse" or "cosine") at
    ``weight``. The widths (last dimension) are found by a forward pass on ``Distiller(example=...)``
    or given here; a projection is made when they differ."""

    student: str
    teacher: str
    kind: str = "mse"
    weight: float = 1.0
    student_width: Optional[int] = None
    teacher_width: Optional[int] = None

    @property
    def name(self) -> str:
        return f"{self.student}->{self.teacher}"


@dataclass
class DistillOutput:
    """One batch: ``loss`` (what to backpropagate), and detached parts for logging: ``kd`` and ``ce``
    (per supervised row, before weights and τ²), ``features`` (name -> per-position mean), and the
    student's logits."""

    loss: Tensor
    kd: Tensor
    ce: Optional[Tensor]  # None without labels
    features: dict[str, Tensor] = field(default_factory=dict)
    student_logits: Optional[Tensor] = None
    num_rows: int = 0


def _call(model: nn.Module, inputs: Any):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def default_logits(output: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, ``.logits`` (Hugging Face), or the first
    element of a tuple."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__}: pass logits_fn=")


def _tensor_of(output: Any) -> Tensor:
    """A hooked module's output as one tensor (the first element of a tuple, ``last_hidden_state``)."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"a hooked module returned a {type(output).__name__}, not a tensor")


class Distiller(nn.Module):
    """Knowledge distillation of ``teacher`` into ``student`` (see the module doc).

    Args:
        divergence: any name in ``distill.losses.DIVERGENCES`` (forward_kl: Hinton's soft targets).
        temperature: τ, softening both sides; with ``scale_by_tau2`` the KD term is multiplied by τ².
        kd_weight, ce_weight: the weights of the KD and hard-label CE terms (CE needs labels).
        features: ``FeatureMatch`` es, added to the loss with their weights.
        example: a batch to find the feature widths with (one forward of each model, no gradients).
        logits_fn: output -> logits, for models whose output ``default_logits`` cannot read.
        ignore_index: labels with this value are left out of KD and CE (padding in sequence tasks).
        divergence_kwargs: e.g. ``beta=0.5`` for jsd.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, divergence: str = "forward_kl",
                 temperature: float = 2.0, scale_by_tau2: bool = True, kd_weight: float = 0.5,
                 ce_weight: float = 0.5, features: Sequence[FeatureMatch] = (), example: Any = None,
                 logits_fn: Callable[[Any], Tensor] = default_logits, ignore_index: int = -100,
                 **divergence_kwargs: float):
        super().__init__()
        get_divergence(divergence)  # an unknown name fails here, listing the known ones
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.student = student
        object.__setattr__(self, "_teacher", teacher)  # not a submodule: no parameters, no state_dict entries
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.divergence, self.temperature, self.scale_by_tau2 = divergence, temperature, scale_by_tau2
        self.kd_weight, self.ce_weight, self.ignore_index = kd_weight, ce_weight, ignore_index
        self.divergence_kwargs, self.logits_fn = divergence_kwargs, logits_fn
        self.matches = list(features)
        self._captured: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}}
        self._hooks = []
        for m in self.matches:
            if m.kind not in HIDDEN_KINDS:
                raise ValueError(f"feature {m.name}: kind must be one of {HIDDEN_KINDS}, got {m.kind!r}")
            for side, model, name in (("student", student, m.student), ("teacher", teacher, m.teacher)):
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    names = [n for n, _ in model.named_modules() if n][:12]
                    raise ValueError(f"feature {m.name}: the {side} has no submodule {name!r} "
                                     f"(some it has: {', '.join(names)})") from None
                self._hooks.append(module.register_forward_hook(self._hook(side, name)))
        if any(m.student_width is None or m.teacher_width is None for m in self.matches):
            if example is None:
                raise ValueError("give example= (a batch) or each FeatureMatch's widths, to size the projections")
            with torch.no_grad():
                _call(student, example)
                _call(teacher, example)
            for m in self.matches:
                m.student_width = m.student_width or self._captured["student"][m.student].shape[-1]
                m.teacher_width = m.teacher_width or self._captured["teacher"][m.teacher].shape[-1]
        self.projections = nn.ModuleDict({
            str(i): FeatureProjection(m.student_width, m.teacher_width) for i, m in enumerate(self.matches)})

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    def _hook(self, side: str, name: str):
        def hook(module, args, output):
            self._captured[side][name] = _tensor_of(output)
        return hook

    def remove_hooks(self) -> None:
        """Detach the forward hooks from both models (the Distiller stops working)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def forward(self, inputs: Any, labels: Optional[Tensor] = None, *, mask: Optional[Tensor] = None,
                reduction: str = "mean") -> DistillOutput:
        """The loss on one batch. ``labels`` (shape of the logits without the class axis; class ids, or
        ``ignore_index``) are needed when ``ce_weight > 0``. ``mask`` (bool, the leading shape of the
        hooked features without the width) leaves padded positions out of the feature terms.
        ``reduction``: "mean" (KD and CE per supervised row, features per position) or "sum" (sums,
        for a loop that divides once itself)."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        with torch.no_grad():
            t_logits = self.logits_fn(_call(self.teacher, inputs))
        s_logits = self.logits_fn(_call(self.student, inputs))
        if s_logits.shape[-1] != t_logits.shape[-1]:
            raise ValueError(f"the student has {s_logits.shape[-1]} outputs and the teacher {t_logits.shape[-1]}")
        unlabeled = labels is None
        if unlabeled:
            if self.ce_weight:
                raise ValueError("ce_weight > 0 needs labels (or set ce_weight=0)")
            labels = torch.zeros(s_logits.shape[:-1], dtype=torch.long, device=s_logits.device)  # only its mask is used
        parts = kd_loss(s_logits, t_logits, labels.to(s_logits.device), divergence=self.divergence,
                        temperature=self.temperature, scale_by_tau2=self.scale_by_tau2, kd_weight=self.kd_weight,
                        ce_weight=self.ce_weight, ignore_index=self.ignore_index, **self.divergence_kwargs)
        rows = parts.num_supervised.clamp_min(1)
        per = (lambda x: x / rows) if reduction == "mean" else (lambda x: x)  # noqa: E731
        loss = per(parts.loss)
        values = {}
        for i, m in enumerate(self.matches):
            s_feat, t_feat = self._captured["student"][m.student], self._captured["teacher"][m.teacher]
            term = hidden_state_loss(s_feat, t_feat, kind=m.kind, projection=self.projections[str(i)])  # (...)
            if mask is not None:
                keep = mask.to(term.device).bool()
                total, count = torch.where(keep, term, 0.0).sum(), keep.sum().clamp_min(1)
            else:
                total, count = term.sum(), term.numel()
            value = total / count if reduction == "mean" else total
            values[m.name] = value.detach()
            loss = loss + m.weight * value
        self._captured["student"].clear()
        self._captured["teacher"].clear()
        return DistillOutput(loss=loss, kd=per(parts.kd), ce=None if unlabeled else per(parts.ce), features=values,
                             student_logits=s_logits.detach(), num_rows=int(parts.num_supervised))

    def fit(self, loader: Iterable, optimizer: torch.optim.Optimizer, *, epochs: int = 1,
            max_grad_norm: Optional[float] = None, progress: bool = True,
            on_step: Optional[Callable[[int, DistillOutput], None]] = None) -> list[dict]:
        """Train over ``loader`` for ``epochs``. Each item is ``(inputs, labels)``, ``inputs`` alone, or a
        dict whose ``"labels"`` entry is taken out and the rest passed to the models. Returns one record
        per step (loss, kd, ce and the feature terms, floats)."""
        from tqdm.auto import tqdm

        self.student.train()
        history = []
        step = 0
        for epoch in range(epochs):
            for batch in tqdm(loader, desc=f"distill epoch {epoch + 1}/{epochs}", disable=not progress,
                              leave=False):
                if isinstance(batch, dict):
                    batch = dict(batch)
                    inputs, labels = batch, batch.pop("labels", None)
                elif isinstance(batch, (tuple, list)) and len(batch) == 2:
                    inputs, labels = batch
                else:
                    inputs, labels = batch, None
                out = self(inputs, labels)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.parameters(), max_grad_norm)
                optimizer.step()
                step += 1
                record = {"step": step, "loss": out.loss.item(), "kd": out.kd.item(),
                          "ce": out.ce.item() if out.ce is not None else None,
                          **{f"feature/{k}": v.item() for k, v in out.features.items()}}
                history.append(record)
                if on_step is not None:
                    on_step(step, out)
        return history
