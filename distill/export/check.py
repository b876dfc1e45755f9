"""How far an exported build's next-token log-probabilities are from the source model's."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def logprob_stats(ref: np.ndarray, ours: np.ndarray, ids: Sequence[int]) -> dict:
    """``ref`` and ``ours``: (T, V) log-probabilities for the tokens ``ids`` (row t: the
    distribution of token t+1). Mean / 95th-percentile / max |Δ log p| of the observed next tokens,
    mean KL(ref ‖ ours) and top-1 agreement over every position."""
    vocab = min(ref.shape[-1], ours.shape[-1])
    ref, ours = ref[:, :vocab], ours[:, :vocab]
    targets = np.asarray(ids[1:])
    rows = np.arange(len(targets))
    delta = np.abs(ref[:-1][rows, targets] - ours[:-1][rows, targets])  # (T-1,)
    kl = (np.exp(ref) * (ref - ours)).sum(-1)  # (T,)
    return {"positions": int(len(targets)), "mean_abs_dlogp": float(delta.mean()),
            "p95_abs_dlogp": float(np.quantile(delta, 0.95)), "max_abs_dlogp": float(delta.max()),
            "mean_kl": float(kl.mean()), "top1_agreement": float((ref.argmax(-1) == ours.argmax(-1)).mean())}


def hf_logprobs(model, ids: Sequence[int]) -> np.ndarray:
    """float64 log-probabilities of an HF causal LM at every position of ``ids``: (T, V)."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([list(ids)], device=model.device)).logits[0]
    return torch.log_softmax(logits.double(), -1).cpu().numpy()
