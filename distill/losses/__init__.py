"""Distillation losses: pure tensor functions, no config, no models (see LOSSES.md).

- ``divergences``: per-position divergences (forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl,
  tvd), each also as a sum over the vocabulary from log-probabilities (``divergence_sum``),
  hard-label cross_entropy, and the registry that maps names to them.
- ``objective``: ``kd_loss``, the weighted sum over supervised positions (sums and a count).
- ``chunked``: ``chunked_kd_loss``, the same objective fused with the LM head, chunked over tokens.
- ``vocab_parallel``: ``vocab_parallel_kd_loss``, the chunked objective with each process holding one
  vocabulary slice of both heads (imported as ``distill.losses.vocab_parallel``).
- ``sparse``: forward KL against top-k / sampled teacher targets (``sparse_forward_kl``,
  ``sparse_kd_loss``, ``SparseTargets``, ``topk_targets``, ``sampled_targets``).
- ``vocab``: slicing padded vocabularies, checking that two tokenizers agree.
- ``cross_tokenizer``: alignment by bytes, exact-match over shared tokens, ULD.
- ``features``: hidden-state, attention-map, attention-relation (MiniLM v2), RKD and embedding losses,
  layer maps and the learned width projection (imported as ``distill.losses.features``).
"""

from distill.losses.chunked import DEFAULT_CHUNK_SIZE, chunk_slices, chunked_kd_loss
from distill.losses.divergences import (
    DIVERGENCES,
    cross_entropy,
    divergence_params,
    divergence_sum,
    forward_kl,
    get_divergence,
    jsd,
    register_divergence,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tvd,
)
from distill.losses.objective import LossParts, kd_loss, tau2_scale
from distill.losses.sparse import (
    SPARSE_MODES,
    SparseTargets,
    sampled_targets,
    sparse_forward_kl,
    sparse_kd_loss,
    topk_targets,
)
from distill.losses.vocab import (
    TokenizerMismatchError,
    check_tokenizers_compatible,
    shared_vocab_size,
    slice_vocab,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIVERGENCES",
    "LossParts",
    "SPARSE_MODES",
    "SparseTargets",
    "TokenizerMismatchError",
    "check_tokenizers_compatible",
    "chunk_slices",
    "chunked_kd_loss",
    "cross_entropy",
    "divergence_params",
    "divergence_sum",
    "forward_kl",
    "get_divergence",
    "jsd",
    "kd_loss",
    "register_divergence",
    "reverse_kl",
    "sampled_targets",
    "shared_vocab_size",
    "skew_kl",
    "skew_reverse_kl",
    "slice_vocab",
    "sparse_forward_kl",
    "sparse_kd_loss",
    "tau2_scale",
    "topk_targets",
    "tvd",
]
