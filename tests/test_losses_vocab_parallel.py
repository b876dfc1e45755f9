"""vocab_parallel_kd_loss == the objective on the whole vocabulary, values and gradients: with one
process against the float64 reference and chunked_kd_loss, and with two gloo processes (each its
own tokens, each one slice of both heads) against the dense loss on each process's tokens."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill.losses import chunked_kd_loss, kd_loss
from distill.losses.vocab_parallel import vocab_parallel_kd_loss, vocab_slice
from tests.reference import CASE_IDS, CASES, ref_kd_loss

D_S, D_T, V = 16, 24, 53
SETTINGS = dict(temperature=2.0, kd_weight=0.8, ce_weight=0.3, chunk_size=10)


def tensors(n, *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = dict(
        student_hidden=torch.randn(n, D_S, generator=g, dtype=torch.float64).to(dtype),
        student_weight=(torch.randn(V, D_S, generator=g, dtype=torch.float64) / 2).to(dtype),
        teacher_hidden=torch.randn(n, D_T, generator=g, dtype=torch.float64).to(dtype),
        teacher_weight=(torch.randn(V, D_T, generator=g, dtype=torch.float64) / 2).to(dtype),
        labels=torch.randint(0, V, (n,), generator=g),
    )
    t["labels"][:12] = -100  # the first chunk is entirely unsupervised
    t["labels"][-2] = -100
    return t


def reference_float64(t, case, **settings):
    """(loss, kd, ce) of ref_kd_loss on the float64 logits and the gradients of loss."""
    hidden = t["student_hidden"].double().requires_grad_()
    weight = t["student_weight"].double().requires_grad_()
    teacher = t["teacher_hidden"].double() @ t["teacher_weight"].double().T  # (N, V)
    loss, kd, ce, count = ref_kd_loss(hidden @ weight.T, teacher, t["labels"], case.reference,
                                      **{k: v for k, v in settings.items() if k != "chunk_size"}, **case.params)
    return [loss.detach(), kd, ce, count], torch.autograd.grad(loss, [hidden, weight])


def ours(t, case, rows=slice(None), vocab=slice(None), **settings):
    hidden = t["student_hidden"][rows].clone().requires_grad_()
    weight = t["student_weight"][vocab].clone().requires_grad_()
    parts = vocab_parallel_kd_loss(hidden, weight, t["labels"][rows], vocab_size=V,
                                   teacher_hidden=t["teacher_hidden"][rows], teacher_weight=t["teacher_weight"][vocab],
                                   divergence=case.name, **case.params, **settings)
    values = [parts.loss.detach(), parts.kd, parts.ce, parts.num_supervised]
    return values, torch.autograd.grad(parts.loss, [hidden, weight])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_one_process_matches_the_float64_reference_and_the_chunked_loss(case):
    t = tensors(37)
    (values, grads), (ref_values, ref_grads) = ours(t, case, **SETTINGS), reference_float64(t, case, **SETTINGS)
    for got, want in zip(values, ref_values):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)

    hidden, weight = t["student_hidden"].clone().requires_grad_(), t["student_weight"].clone().requires_grad_()
    chunked = chunked_kd_loss(hidden, weight, t["labels"], teacher_hidden=t["teacher_hidden"],
                              teacher_weight=t["teacher_weight"], divergence=case.name, **case.params, **SETTINGS)
    torch.testing.assert_close(values[0], chunked.loss.detach(), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(chunked.loss, [hidden, weight])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_vocab_slice_is_torch_chunk_s_split():
    for vocab, world in [(53, 2), (53, 4), (10, 4), (3, 4), (128256, 8)]:
        expected = [len(c) for c in torch.arange(vocab).chunk(world)]
        expected += [0] * (world - len(expected))
        assert [vocab_slice(vocab, r, world).stop - vocab_slice(vocab, r, world).start for r in range(world)] == expected
        assert vocab_slice(vocab, world - 1, world).stop == vocab


def test_bad_arguments_are_refused():
    t = tensors(5)
    with pytest.raises(ValueError, match="head rows 0:53"):
        vocab_parallel_kd_loss(t["student_hidden"], t["student_weight"][:50], t["labels"], vocab_size=V,
                               teacher_hidden=t["teacher_hidden"], teacher_weight=t["teacher_weight"][:50])
    with pytest.raises(ValueError, match="0 < beta < 1"):
        vocab_parallel_kd_loss(t["student_hidden"], t["student_weight"], t["labels"], vocab_size=V, divergence="jsd",
                               beta=1.0, teacher_hidden=t["teacher_hidden"], teacher_weight=t["teacher_weight"])
    with pytest.raises(ValueError, match="kd_weight"):
        vocab_parallel_kd_loss(t["student_hidden"], t["student_weight"], t["labels"], vocab_size=V)


def test_a_second_backward_is_an_error_not_twice_the_gradient():
    t = tensors(5)
    hidden = t["student_hidden"].requires_grad_()
    parts = vocab_parallel_kd_loss(hidden, t["student_weight"], t["labels"], vocab_size=V,
                                   teacher_hidden=t["teacher_hidden"], teacher_weight=t["teacher_weight"])
    parts.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once per forward"):
        parts.loss.backward()


# --- two processes ----------------------------------------------------------------------------

# Each process's tokens (37 in all): unequal counts, and in one setting a process with none at all.
SPLITS = {2: {"unequal": [23, 14], "one empty": [0, 37]}, 3: {"unequal": [15, 8, 14], "one empty": [20, 0, 17]}}


def _dense_on(t, case, rows, **settings):
    """kd_loss on the whole-vocabulary logits of ``rows``: (values, grad hidden rows, grad whole head)."""
    settings = {k: v for k, v in settings.items() if k != "chunk_size"}
    hidden = t["student_hidden"][rows].clone().requires_grad_()
    weight = t["student_weight"].clone().requires_grad_()
    teacher = t["teacher_hidden"][rows] @ t["teacher_weight"].T if case is not None else None
    parts = kd_loss(hidden @ weight.T, teacher, t["labels"][rows], divergence=getattr(case, "name", "forward_kl"),
                    **getattr(case, "params", {}), **settings)
    grads = torch.autograd.grad(parts.loss, [hidden, weight])
    return [parts.loss.detach(), parts.kd, parts.ce, parts.num_supervised], grads


def _worker(rank, store, world):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        vocab = vocab_slice(V, rank, world)
        settings_list = [("kd+ce", SETTINGS), ("ce only", {**SETTINGS, "kd_weight": 0.0, "temperature": 1.0}),
                         ("tau=1 kd only", {**SETTINGS, "temperature": 1.0, "ce_weight": 0.0})]
        for split_name, split in SPLITS[world].items():
            rows = slice(sum(split[:rank]), sum(split[: rank + 1]))
            for case in CASES:
                for name, settings in settings_list:
                    t = tensors(37)
                    values, (grad_hidden, grad_weight) = ours(t, case, rows=rows, vocab=vocab, **settings)
                    want_values, (want_hidden, _) = _dense_on(t, case, rows, **settings)
                    _, (_, want_weight) = _dense_on(t, case, slice(None), **settings)  # every process's tokens
                    where = f"process {rank}, {split_name}, {case}, {name}"
                    for got, want in zip(values, want_values):
                        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}")
                    torch.testing.assert_close(grad_hidden, want_hidden, rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{where}, hidden: {m}")
                    torch.testing.assert_close(grad_weight, want_weight[vocab], rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{where}, head: {m}")
        # bf16 autocast: the matmuls in bf16, the math float32; close to the float32 loss
        t = tensors(37)
        split = SPLITS[world]["unequal"]
        rows = slice(sum(split[:rank]), sum(split[: rank + 1]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            values, grads = ours(t, CASES[0], rows=rows, vocab=vocab, **SETTINGS)
        want_values, (want_hidden, _) = _dense_on(t, CASES[0], rows, **SETTINGS)
        torch.testing.assert_close(values[0], want_values[0], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(grads[0], want_hidden, rtol=5e-2, atol=5e-3)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])  # the 53-row heads in halves (27, 26) and thirds (18, 18, 17)
def test_processes_each_with_a_slice_of_the_heads_match_the_whole_vocabulary(tmp_path, world):
    # A failed comparison in any process raises here (ProcessRaisedException) with its message.
    mp.start_processes(_worker, args=(str(tmp_path / "store"), world), nprocs=world, start_method="spawn")
