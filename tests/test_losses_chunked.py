"""chunked_kd_loss == kd_loss on the full logits, values and gradients, whatever the chunking."""

import pytest
import torch

import distill.losses.chunked as chunked_module
from distill.losses import chunk_slices, chunked_kd_loss, kd_loss, slice_vocab
from tests.reference import CASE_IDS, CASES

D_S, D_T, V = 16, 24, 53
SETTINGS = dict(temperature=2.0, kd_weight=0.8, ce_weight=0.3)
# (N, chunk_size): does not divide N (and the first chunk is fully masked), divides N, N < one chunk
CHUNKINGS = [(37, 10), (40, 10), (7, 16)]


def tensors(n, *, seed=0, student_rows=V, teacher_rows=V):
    g = torch.Generator().manual_seed(seed)
    t = dict(
        student_hidden=torch.randn(n, D_S, generator=g),
        student_weight=torch.randn(student_rows, D_S, generator=g) / 2,
        student_bias=torch.randn(student_rows, generator=g),
        teacher_hidden=torch.randn(n, D_T, generator=g),
        teacher_weight=torch.randn(teacher_rows, D_T, generator=g) / 2,
        teacher_bias=torch.randn(teacher_rows, generator=g),
        labels=torch.randint(0, V, (n,), generator=g),
    )
    t["labels"][:10] = -100  # the first chunk of 10 is entirely unsupervised
    t["labels"][-2] = -100
    return t


def student_params(t):
    return [t[k].requires_grad_() for k in ("student_hidden", "student_weight", "student_bias")]


def dense(t, vocab_size=V, **settings):
    """The straightforward path: full logits on both sides, sliced to the vocabulary, kd_loss."""
    student_logits = t["student_hidden"] @ t["student_weight"].T + t["student_bias"]  # (N, V_s)
    teacher_logits = t["teacher_hidden"] @ t["teacher_weight"].T + t["teacher_bias"]  # (N, V_t)
    return kd_loss(
        slice_vocab(student_logits, vocab_size), slice_vocab(teacher_logits, vocab_size), t["labels"], **settings
    )


def chunked(t, teacher_form="hidden", **settings):
    teacher = dict(teacher_hidden=t["teacher_hidden"], teacher_weight=t["teacher_weight"], teacher_bias=t["teacher_bias"])
    if teacher_form == "logits":
        teacher = dict(teacher_logits=t["teacher_hidden"] @ t["teacher_weight"].T + t["teacher_bias"])  # (N, V_t)
    return chunked_kd_loss(t["student_hidden"], t["student_weight"], t["labels"], student_bias=t["student_bias"],
                           **teacher, **settings)


def values_and_grads(parts, params, scale=1.0):
    grads = torch.autograd.grad(parts.loss * scale, params)
    return [parts.loss.detach(), parts.kd, parts.ce, parts.num_supervised], grads


def assert_same(got, want, rtol=1e-5):
    (values, grads), (ref_values, ref_grads) = got, want
    for value, ref in zip(values, ref_values):
        torch.testing.assert_close(value, ref.detach(), rtol=rtol, atol=1e-6)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


@pytest.mark.parametrize("teacher_form", ["hidden", "logits"])
@pytest.mark.parametrize("n, chunk_size", CHUNKINGS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_equals_dense(case, n, chunk_size, teacher_form):
    t = tensors(n)
    params = student_params(t)
    settings = dict(divergence=case.name, **SETTINGS, **case.params)
    # the caller divides by the global count: the gradient arrives scaled, not 1
    got = values_and_grads(chunked(t, teacher_form, chunk_size=chunk_size, **settings), params, scale=1 / 29)
    want = values_and_grads(dense(t, **settings), params, scale=1 / 29)
    assert_same(got, want)


def test_chunks_come_from_chunk_slices(monkeypatch):
    """Each kd_loss call sees one chunk of rows from chunk_slices, the teacher's logits included."""
    seen = []

    def recording_kd_loss(student_logits, teacher_logits, labels, **kwargs):
        seen.append((student_logits.shape[0], teacher_logits.shape[0], labels.shape[0]))
        return kd_loss(student_logits, teacher_logits, labels, **kwargs)

    monkeypatch.setattr(chunked_module, "kd_loss", recording_kd_loss)
    t = tensors(37)
    student_params(t)
    chunked(t, chunk_size=10).loss.backward()
    assert seen == [(s.stop - s.start,) * 3 for s in chunk_slices(37, 10)]
    assert [s.stop - s.start for s in chunk_slices(37, 10)] == [10, 10, 10, 7]
    assert chunk_slices(0, 10) == []
    with pytest.raises(ValueError):
        chunk_slices(10, 0)


def test_vocab_size_slices_padded_heads():
    """Student head padded by 3 rows, teacher by 11: only the first V columns count, padded rows
    of the student head get zero gradient, and the default is the narrower head."""
    t = tensors(37, student_rows=V + 3, teacher_rows=V + 11)
    params = student_params(t)
    want = values_and_grads(dense(t, vocab_size=V, **SETTINGS), params)
    got = values_and_grads(chunked(t, vocab_size=V, chunk_size=8, **SETTINGS), params)
    assert_same(got, want)
    assert (got[1][1][V:] == 0).all() and (got[1][2][V:] == 0).all()

    narrower = values_and_grads(chunked(t, chunk_size=8, **SETTINGS), params)
    assert_same(narrower, values_and_grads(dense(t, vocab_size=V + 3, **SETTINGS), params))
    with pytest.raises(ValueError, match="vocab_size"):
        chunked(t, vocab_size=V + 4)


def test_teacher_gets_no_gradient():
    t = tensors(20)
    student_params(t)
    for key in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        t[key].requires_grad_()
    parts = chunked(t, chunk_size=6, **SETTINGS)
    parts.loss.backward()
    assert t["student_weight"].grad is not None
    assert all(t[k].grad is None for k in ("teacher_hidden", "teacher_weight", "teacher_bias"))
    assert parts.loss.requires_grad and not parts.kd.requires_grad and not parts.ce.requires_grad


def test_all_masked_gives_zeros_not_nan():
    t = tensors(23)
    t["labels"][:] = -100
    params = student_params(t)
    parts = chunked(t, chunk_size=5, divergence="reverse_kl", **SETTINGS)
    assert [v.item() for v in (parts.loss, parts.kd, parts.ce, parts.num_supervised)] == [0, 0, 0, 0]
    parts.loss.backward()
    assert all((p.grad == 0).all() for p in params)


def test_supervised_only_without_teacher():
    t = tensors(37)
    params = student_params(t)
    got = chunked_kd_loss(t["student_hidden"], t["student_weight"], t["labels"], student_bias=t["student_bias"],
                          kd_weight=0.0, ce_weight=1.0, chunk_size=9)
    student_logits = t["student_hidden"] @ t["student_weight"].T + t["student_bias"]  # (N, V)
    want = kd_loss(student_logits, None, t["labels"], kd_weight=0.0, ce_weight=1.0)
    assert_same(values_and_grads(got, params), values_and_grads(want, params))
    with pytest.raises(ValueError, match="kd_weight"):
        chunked_kd_loss(t["student_hidden"], t["student_weight"], t["labels"])


def test_without_bias_and_weight_frozen():
    t = tensors(37)
    hidden = t["student_hidden"].requires_grad_()
    parts = chunked_kd_loss(hidden, t["student_weight"], t["labels"], teacher_hidden=t["teacher_hidden"],
                            teacher_weight=t["teacher_weight"], chunk_size=10)
    (grad,) = torch.autograd.grad(parts.loss, hidden)
    dense_parts = kd_loss(hidden @ t["student_weight"].T, t["teacher_hidden"] @ t["teacher_weight"].T, t["labels"])
    (want,) = torch.autograd.grad(dense_parts.loss, hidden)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


def test_backward_runs_once():
    t = tensors(12)
    student_params(t)
    parts = chunked(t, chunk_size=5)
    parts.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        parts.loss.backward()


def test_teacher_given_twice_is_an_error():
    t = tensors(12)
    with pytest.raises(ValueError, match="not both"):
        chunked_kd_loss(t["student_hidden"], t["student_weight"], t["labels"], teacher_logits=torch.zeros(12, V),
                        teacher_hidden=t["teacher_hidden"], teacher_weight=t["teacher_weight"])


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[CASE_IDS[0], CASE_IDS[2]])
def test_bfloat16_autocast(case):
    """Matmuls in bf16, loss math in float32: close to float32 (bf16 has an 8-bit mantissa), float32 grads."""
    t = tensors(37)
    params = student_params(t)
    settings = dict(divergence=case.name, **SETTINGS, **case.params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = chunked(t, chunk_size=10, **settings)
        got = values_and_grads(parts, params)
    assert parts.loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1])
    assert_same(got, values_and_grads(dense(t, **settings), params), rtol=3e-2)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[6]], ids=[CASE_IDS[0], CASE_IDS[2], CASE_IDS[6]])
def test_compiled_equals_eager(case):
    """compiled=True (each chunk's objective and gradient under torch.compile) == the eager path, values and
    gradients, with a shorter last chunk (a second compiled shape) and a fully masked first chunk."""
    t = tensors(37)
    params = student_params(t)
    settings = dict(divergence=case.name, **SETTINGS, **case.params)
    calls = chunked_module._compiled_objective.cache_info()
    got = values_and_grads(chunked(t, chunk_size=10, compiled=True, **settings), params, scale=1 / 29)
    after = chunked_module._compiled_objective.cache_info()
    assert after.hits + after.misses - calls.hits - calls.misses == 4  # every chunk went the compiled way
    want = values_and_grads(dense(t, **settings), params, scale=1 / 29)
    assert_same(got, want)


def test_compiled_without_teacher_and_with_teacher_logits():
    """The compiled path with CE alone (no teacher at all) and with the teacher given as logits."""
    t = tensors(37)
    params = student_params(t)
    ce_only = dict(kd_weight=0.0, ce_weight=1.0)
    got = values_and_grads(chunked_kd_loss(t["student_hidden"], t["student_weight"], t["labels"],
                                           student_bias=t["student_bias"], chunk_size=10, compiled=True, **ce_only),
                           params)
    student_logits = t["student_hidden"] @ t["student_weight"].T + t["student_bias"]  # (N, V)
    want = values_and_grads(kd_loss(student_logits, None, t["labels"], **ce_only), params)
    assert_same(got, want)
    got = values_and_grads(chunked(t, "logits", chunk_size=10, compiled=True, **SETTINGS), params)
    want = values_and_grads(dense(t, **SETTINGS), params)
    assert_same(got, want)
