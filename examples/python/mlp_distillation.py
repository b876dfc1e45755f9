"""Distill a wide MLP into a small one on a tabular task, with distill's plain-module API.

    python examples/python/mlp_distillation.py [--seeds 0 1 2]

No transformer and no config file: ``distill.distiller.Distiller`` takes any teacher / student
that map a batch to logits. The task: 16 classes in 24 dimensions, each class a mixture of 6
Gaussian blobs. The teacher (24 → 512 → 512 → 16) trains with CE on 20k labelled rows. The
students (24 → 64 → 16, same seed and about the same number of optimizer steps) have 600 labelled
rows and, as in Hinton et al.'s transfer set, 10k unlabelled ones:

- ``ce``: cross-entropy on the 600 labelled rows (the unlabelled ones are of no use to it);
- ``kd``: Hinton's soft targets at τ = 4 on the 10k unlabelled rows (kd only, τ² scaling);
- ``kd+hidden``: plus FitNets on the hidden layer (student 64 → teacher 512 through a learned
  projection, MSE, weight 0.5).

Prints held-out accuracy and agreement with the teacher per student.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from distill.distiller import Distiller, FeatureMatch

DIM, CLASSES, BLOBS = 24, 16, 6


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)  # the task: the same blob centres for every split
    centres = torch.randn(CLASSES * BLOBS, DIM, generator=g) * 1.1
    g = torch.Generator().manual_seed(seed)
    blob = torch.randint(0, CLASSES * BLOBS, (n,), generator=g)
    x = centres[blob] + torch.randn(n, DIM, generator=g)
    return x, blob // BLOBS


def mlp(width: int, depth: int) -> nn.Sequential:
    layers, d = [], DIM
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.GELU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, CLASSES))


def batches(x, y, size, seed):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(x), size):
        yield x[order[i:i + size]], y[order[i:i + size]]


def train(model_or_distiller, x, y, *, epochs: int, seed: int, lr: float = 3e-3) -> None:
    optimizer = torch.optim.AdamW(model_or_distiller.parameters(), lr=lr, weight_decay=1e-4)
    for epoch in range(epochs):
        for xb, yb in batches(x, y, 64, seed * 1000 + epoch):
            if isinstance(model_or_distiller, Distiller):  # unlabelled: the teacher's soft targets only
                loss = model_or_distiller(xb).loss
            else:
                loss = nn.functional.cross_entropy(model_or_distiller(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def score(model, teacher, x, y) -> tuple[float, float]:
    pred = model(x).argmax(-1)
    return (pred == y).float().mean().item(), (pred == teacher(x).argmax(-1)).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    x_teacher, y_teacher = make_data(20000, seed=1)  # the teacher saw plenty of labelled data
    x_train, y_train = make_data(600, seed=2)  # the students get a small labelled set
    x_transfer, y_transfer = make_data(10000, seed=4)  # and unlabelled inputs (y_transfer unused)
    x_test, y_test = make_data(4000, seed=3)
    torch.manual_seed(0)
    teacher = mlp(512, 2)
    train(teacher, x_teacher, y_teacher, epochs=15, seed=0)
    teacher.eval()
    acc, _ = score(teacher, teacher, x_test, y_test)
    print(f"teacher (24-512-512-16, {sum(p.numel() for p in teacher.parameters()):,} params): "
          f"test accuracy {acc:.1%}")
    print("\n| student | seed | test accuracy | agreement with teacher |\n|---|---|---|---|")
    for seed in args.seeds:
        for arm in ("ce", "kd", "kd+hidden"):
            torch.manual_seed(seed)
            student = mlp(64, 1)
            if arm == "ce":  # 60 epochs of 10 batches
                train(student, x_train, y_train, epochs=args.epochs, seed=seed)
            else:  # 4 epochs of 157 batches: about the same number of steps
                features = [FeatureMatch("1", "3", kind="mse", weight=0.5)] if arm == "kd+hidden" else []
                distiller = Distiller(student, teacher, temperature=4.0, kd_weight=1.0, ce_weight=0.0,
                                      features=features, example=x_train[:2])
                train(distiller, x_transfer, y_transfer, epochs=max(1, args.epochs // 15), seed=seed)
            student.eval()
            acc, agree = score(student, teacher, x_test, y_test)
            print(f"| {arm} | {seed} | {acc:.1%} | {agree:.1%} |", flush=True)


if __name__ == "__main__":
    main()
