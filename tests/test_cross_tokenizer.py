"""Cross-tokenizer distillation: byte-offset alignment on real tokenizer pairs, and the losses
(exact-match over the shared vocabulary, merged spans, ULD) against float64 references."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from distill.losses import get_divergence
from distill.losses.cross_tokenizer import (AlignmentError, align_spans, byte_ends, coarsen, exact_match_divergence,
                                            log1mexp, shared_token_ids, span_divergence, token_bytes, uld_distance)
from reference import CASE_IDS, CASES, probs
from tokenizer_zoo import corpus_texts, train_tokenizer

ASSETS = "distill/assets/tokenizer"
HARD = [
    "def f(x):\n    return 'héllo'  # naïve café\n",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 in one line",
    "中文分词很难，日本語も。한국어도",
    "\tif x:\n\t\tpass\n\n\n    y = [1,2,3]   \n",
    "Ünïcödé àccents: Ångström, façade, coöperate — ∑∫√",
    "",
    "a",
]


@pytest.fixture(scope="module")
def zoo():
    texts = corpus_texts(200_000) + HARD
    return {"bpe8k": AutoTokenizer.from_pretrained(ASSETS),
            "bpe1k": train_tokenizer(texts, "bpe", 1000),
            "unigram": train_tokenizer(texts, "unigram", 1000),
            "wordpiece": train_tokenizer(texts, "wordpiece", 1000)}


# --------------------------------------------------------------------------------------------- alignment


def test_align_spans_hand_cases():
    # "abcdef": teacher [ab][cd][ef], student [a][bcd][ef]: common boundaries at 4 and 6.
    assert [(s.t0, s.t1, s.s0, s.s1) for s in align_spans([2, 4, 6], [1, 4, 6])] == [(0, 2, 0, 2), (2, 3, 2, 3)]
    # Identical tokenizations: one span per token.
    assert all(s.single for s in align_spans([1, 3, 6], [1, 3, 6]))
    # Two pieces of one multibyte character share its end: never a boundary between them.
    assert [(s.t0, s.t1, s.s0, s.s1) for s in align_spans([1, 3, 3], [1, 2, 3])] == [(0, 1, 0, 1), (1, 3, 1, 3)]
    # A tail past the last common boundary belongs to no span (e.g. whitespace one side drops).
    assert [(s.t0, s.t1) for s in align_spans([2, 5], [2, 4])] == [(0, 1)]
    assert align_spans([], [3]) == []


@pytest.mark.parametrize("student", ["bpe1k", "unigram", "wordpiece"])
@pytest.mark.parametrize("text", HARD, ids=range(len(HARD)))
def test_spans_cover_the_same_bytes_on_real_tokenizer_pairs(zoo, student, text):
    teacher = zoo["bpe8k"]
    t_ids, t_ends = byte_ends(teacher, text)
    s_ids, s_ends = byte_ends(zoo[student], text)
    spans = align_spans(t_ends, s_ends)
    data = text.encode()
    starts = {0} | {i for i in range(1, len(data) + 1) if i == len(data) or (data[i] & 0xC0) != 0x80}
    previous = (0, 0)
    for span in spans:
        assert (span.t0, span.s0) == previous  # contiguous, in order, nothing skipped
        end = t_ends[span.t1 - 1]
        assert end == s_ends[span.s1 - 1]  # both sides end the span at the same byte
        assert end in starts  # never inside a UTF-8 character
        # maximal: no common boundary strictly inside the span
        inner_t = {t_ends[i] for i in range(span.t0, span.t1 - 1) if t_ends[i] < t_ends[i + 1]}
        inner_s = {s_ends[i] for i in range(span.s0, span.s1 - 1) if s_ends[i] < s_ends[i + 1]}
        assert not inner_t & inner_s
        previous = (span.t1, span.s1)
    if student == "bpe1k" and text:  # both byte-level: everything aligns, to the last byte
        assert previous == (len(t_ids), len(s_ids))
        t_bytes, s_bytes = token_bytes(teacher), token_bytes(zoo[student])
        for span in spans:
            assert b"".join(t_bytes[i] for i in t_ids[span.t0:span.t1]) == \
                b"".join(s_bytes[i] for i in s_ids[span.s0:span.s1])


def test_multibyte_characters_split_into_byte_tokens_stay_in_one_span(zoo):
    text = "x😀y"
    t_ids, t_ends = byte_ends(zoo["bpe1k"], text)
    assert len(t_ids) > 3  # the 1k BPE splits the emoji into byte tokens
    s_ids, s_ends = byte_ends(zoo["unigram"], text)
    spans = align_spans(t_ends, s_ends)
    assert [t_ends[s.t1 - 1] for s in spans] == [1, 5, 6]


def test_identical_tokenizers_align_every_token_one_to_one(zoo):
    for text in HARD:
        ids, ends = byte_ends(zoo["bpe8k"], text)
        spans = align_spans(ends, ends)
        # every token that ends past the previous one is its own span
        assert all(s.single for s in spans if len(ids)) or any(ends[i] == ends[i + 1] for i in range(len(ends) - 1))
        assert sum(s.t1 - s.t0 for s in spans) == len(ids)


def test_token_bytes_reproduce_the_text(zoo):
    for name in ("bpe8k", "bpe1k", "unigram"):
        tb = token_bytes(zoo[name])
        for text in HARD:
            ids = zoo[name](text, add_special_tokens=False)["input_ids"]
            assert b"".join(tb[i] for i in ids) == text.encode(), name
    tb = token_bytes(zoo["wordpiece"])  # WordPiece drops whitespace and keeps the rest
    text = HARD[0]
    ids = zoo["wordpiece"](text, add_special_tokens=False)["input_ids"]
    assert b"".join(tb[i] for i in ids) == b"".join(text.encode().split())


def test_shared_tokens_are_pairs_of_equal_bytes_plus_eos(zoo):
    t, s = shared_token_ids(zoo["bpe8k"], zoo["unigram"])
    tb, sb = token_bytes(zoo["bpe8k"]), token_bytes(zoo["unigram"])
    assert len(t) == len(s) == len(set(s)) and 100 < len(s) < len(zoo["unigram"])
    for i, j in zip(t, s):
        assert (tb[i] == sb[j]) or (i == zoo["bpe8k"].eos_token_id and j == zoo["unigram"].eos_token_id)
    same_t, same_s = shared_token_ids(zoo["bpe8k"], zoo["bpe8k"])
    assert same_t == same_s == list(range(len(zoo["bpe8k"])))  # every id, special EOS included


def test_a_tokenizer_without_offsets_is_refused(zoo):
    class Slow:
        is_fast = False
        name_or_path = "slow-tok"

    with pytest.raises(AlignmentError, match="no offset mapping"):
        byte_ends(Slow(), "text")


# --------------------------------------------------------------------------------------------- losses

N, VS, VT = 37, 61, 83


def _pairs(seed=0, shared=29):
    g = torch.Generator().manual_seed(seed)
    s_ids = torch.randperm(VS, generator=g)[:shared]
    t_ids = torch.randperm(VT, generator=g)[:shared]
    zs = (torch.randn(N, VS, generator=g) * 2).requires_grad_()
    zt = torch.randn(N, VT, generator=g) * 2
    return zs, zt, s_ids, t_ids


def ref_coarse(logits, ids, temperature):
    p = probs(logits, temperature)
    shared = p[:, ids]
    return torch.cat([shared, 1 - shared.sum(-1, keepdim=True)], -1)


def ref_renormalized(logits, ids, temperature):
    shared = probs(logits, temperature)[:, ids]
    return shared / shared.sum(-1, keepdim=True)


def test_coarsen_against_float64():
    zs, _, s_ids, _ = _pairs()
    got = coarsen(torch.log_softmax(zs.detach(), -1), s_ids).exp()
    torch.testing.assert_close(got.double(), ref_coarse(zs.detach(), s_ids, 1.0), rtol=1e-5, atol=1e-6)
    full = coarsen(torch.log_softmax(zs.detach(), -1), torch.arange(VS))
    assert torch.isneginf(full[:, -1]).all()  # ids covering the vocabulary: an empty rest bucket


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("mode", ["renormalized", "rest_bucket"])
def test_exact_match_against_float64_values_and_gradients(case, temperature, mode):
    zs, zt, s_ids, t_ids = _pairs()
    got = exact_match_divergence(zs, zt, s_ids, t_ids, divergence=case.name, temperature=temperature, mode=mode,
                                 **case.params)
    zs64 = zs.detach().double().requires_grad_()
    ref = ref_coarse if mode == "rest_bucket" else ref_renormalized
    q, p = ref(zs64, s_ids, temperature), ref(zt, t_ids, temperature)
    want = case.reference(q.log(), p.log(), **case.params)  # coarse log-probs as logits: softmax is the identity
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    (g,) = torch.autograd.grad(got.sum(), zs)
    (g64,) = torch.autograd.grad(want.sum(), zs64)
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_identical_vocabularies_reduce_to_the_ordinary_divergence(case):
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(N, VS, generator=g) * 3, torch.randn(N, VS, generator=g) * 3
    ids = torch.arange(VS)
    want = get_divergence(case.name)(zs, zt, temperature=1.5, **case.params)
    for mode in ("renormalized", "rest_bucket"):
        got = exact_match_divergence(zs, zt, ids, ids, divergence=case.name, temperature=1.5, mode=mode, **case.params)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rest_bucket_is_infinite_where_one_vocabulary_lies_inside_the_other_and_renormalized_is_not():
    g = torch.Generator().manual_seed(7)
    zs, zt = torch.randn(4, 10, generator=g), torch.randn(4, 15, generator=g)
    s_ids, t_ids = torch.arange(10), torch.arange(10)  # every student token exists in the teacher's vocabulary
    assert torch.isinf(exact_match_divergence(zs, zt, s_ids, t_ids, mode="rest_bucket")).all()
    assert torch.isfinite(exact_match_divergence(zs, zt, s_ids, t_ids)).all()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_span_divergence_against_float64(case):
    g = torch.Generator().manual_seed(4)
    lq = (-torch.rand(N, generator=g) * 6).requires_grad_()
    lp = -torch.rand(N, generator=g) * 6
    got = span_divergence(lq, lp, divergence=case.name, **case.params)
    lq64 = lq.detach().double().requires_grad_()
    two = lambda lp_: torch.stack([lp_.exp(), 1 - lp_.exp()], -1).log()  # noqa: E731
    want = case.reference(two(lq64), two(lp.double()), **case.params)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    (gr,) = torch.autograd.grad(got.sum(), lq)
    (gr64,) = torch.autograd.grad(want.sum(), lq64)
    torch.testing.assert_close(gr.double(), gr64, rtol=1e-4, atol=1e-6)


def test_span_divergence_is_zero_for_equal_probabilities_and_finite_at_certainty():
    lp = torch.tensor([0.0, -1e-9, -0.5, -30.0])
    for name in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        value = span_divergence(lp, lp, divergence=name)
        assert torch.isfinite(value).all() and value.abs().max() < 1e-6
    x = torch.tensor([-1e-10, -1e-3, -0.69, -0.7, -5.0, -50.0])
    want = torch.log(-torch.expm1(x.double()))  # float64 is exact enough here
    torch.testing.assert_close(log1mexp(x).double(), want, rtol=1e-6, atol=1e-12)
    assert torch.isneginf(log1mexp(torch.tensor(0.0)))


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_uld_against_float64_values_and_gradients(exclude, temperature):
    zs, zt, s_ids, t_ids = _pairs(seed=5)
    kw = dict(student_exclude=s_ids, teacher_exclude=t_ids) if exclude else {}
    got = uld_distance(zs, zt, temperature=temperature, **kw)
    zs64 = zs.detach().double().requires_grad_()
    q, p = probs(zs64, temperature), probs(zt, temperature)
    if exclude:
        keep_s = torch.ones(VS, dtype=torch.bool).index_fill(0, s_ids, False)
        keep_t = torch.ones(VT, dtype=torch.bool).index_fill(0, t_ids, False)
        q, p = q[:, keep_s], p[:, keep_t]
    width = max(q.shape[1], p.shape[1])
    qs = torch.nn.functional.pad(q.sort(-1, descending=True).values, (0, width - q.shape[1]))
    ps = torch.nn.functional.pad(p.sort(-1, descending=True).values, (0, width - p.shape[1]))
    want = (ps - qs).abs().sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(got.sum(), zs)
    (g64,) = torch.autograd.grad(want.sum(), zs64)
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)


def test_uld_is_zero_for_a_permuted_vocabulary_and_positive_otherwise():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 40, generator=g)
    perm = torch.randperm(40, generator=g)
    assert uld_distance(z, z[:, perm]).abs().max() < 1e-6
    padded = torch.cat([z[:, perm], torch.full((5, 7), -float("inf"))], -1)  # a larger vocabulary, unused rows
    assert uld_distance(z, padded).abs().max() < 1e-6
    assert (uld_distance(z, torch.randn(5, 40, generator=g)) > 1e-3).all()


def test_uld_top_k_is_exact_at_full_width_and_a_close_lower_bound_below():
    zs, zt, s_ids, t_ids = _pairs(seed=8)
    exact = uld_distance(zs, zt, temperature=1.3)
    torch.testing.assert_close(uld_distance(zs, zt, temperature=1.3, top_k=max(VS, VT)), exact)
    for k in (1, 5, 20):
        approx = uld_distance(zs, zt, temperature=1.3, top_k=k)
        p_tail = 1 - probs(zt, 1.3).sort(-1, descending=True).values[:, :k].sum(-1)
        q_tail = 1 - probs(zs.detach(), 1.3).sort(-1, descending=True).values[:, :k].sum(-1)
        assert (approx <= exact + 1e-6).all()
        assert (exact - approx <= 2 * torch.minimum(p_tail, q_tail).float() + 1e-6).all()
        approx.sum().backward()  # differentiable


# --------------------------------------------------------------------------------------------- batches


def test_aligner_with_identical_tokenizers_reproduces_the_row(zoo):
    from distill.teachers.cross import Aligner

    tok = zoo["bpe8k"]
    al = Aligner(tok, tok)
    ids = tok(HARD[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    teacher, spans = al.row(ids)
    assert teacher == ids
    assert [(t0, t1, s0, s1) for t0, t1, s0, s1 in spans] == [(k, k + 1, k, k + 1) for k in range(len(ids))]


@pytest.mark.parametrize("student", ["bpe1k", "unigram"])
def test_aligner_spans_spell_the_same_bytes_and_map_eos(zoo, student):
    from distill.teachers.cross import Aligner

    teacher_tok, student_tok = zoo["bpe8k"], zoo[student]
    al = Aligner(teacher_tok, student_tok)
    tb, sb = token_bytes(teacher_tok), token_bytes(student_tok)
    text = HARD[0] + HARD[2] + HARD[1]
    ids = student_tok(text)["input_ids"] + [student_tok.eos_token_id]  # the unigram one starts with its BOS
    teacher, spans = al.row(ids)
    assert spans[-1][1] - spans[-1][0] == 1 and teacher[spans[-1][0]] == teacher_tok.eos_token_id
    assert ids[spans[-1][2]] == student_tok.eos_token_id
    for t0, t1, s0, s1 in spans[:-1]:
        assert b"".join(tb[i] for i in teacher[t0:t1]) == b"".join(sb[i] for i in ids[s0:s1])
    covered = sum(s1 - s0 for *_, s0, s1 in spans)
    assert covered == len(ids) - (1 if student == "unigram" else 0)  # everything but the BOS


def test_aligner_skips_a_row_start_inside_a_character(zoo):
    from distill.teachers.cross import Aligner

    teacher_tok, student_tok = zoo["bpe8k"], zoo["bpe1k"]
    ids = student_tok("😀 abc def", add_special_tokens=False)["input_ids"]
    assert len(student_tok.convert_ids_to_tokens(ids)[0]) == 1  # a byte token: a packed row cut here
    teacher, spans = Aligner(teacher_tok, student_tok).row(ids[1:])
    assert spans and b"".join(token_bytes(teacher_tok)[i] for i in teacher).endswith(b" abc def")


def test_aligner_batch_indices_mask_and_teacher_length(zoo):
    from distill.teachers.cross import Aligner

    teacher_tok, student_tok = zoo["bpe8k"], zoo["unigram"]
    rows = [student_tok(t)["input_ids"] + [student_tok.eos_token_id] for t in (HARD[0], HARD[4])]
    T = max(map(len, rows))
    ids = torch.tensor([r + [student_tok.pad_token_id] * (T - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    mask = attn[:, 1:].bool().clone()
    mask[0, :5] = False  # a "prompt": the first tokens of row 0 are not supervised
    al = Aligner(teacher_tok, student_tok)
    a = al.batch(ids, attn, mask)
    assert a.num_spans > 10
    s_row, s_pos = a.s_first // T, a.s_first % T
    assert (mask[s_row, s_pos]).all()  # every span's first prediction is supervised
    assert ((s_row == 0) & (s_pos < 5)).sum() == 0
    t_ids = a.teacher_inputs["input_ids"]
    T_t = t_ids.shape[1]
    # merged spans: the tokens whose probabilities are multiplied are the row's own next tokens
    assert (ids.flatten()[a.s_pos + 1] == a.s_tok).all() and (t_ids.flatten()[a.t_pos + 1] == a.t_tok).all()
    assert (a.span_tokens >= 1).all() and int(a.single.sum()) + int((~a.single).sum()) == a.num_spans
    capped = Aligner(teacher_tok, student_tok, max_teacher_length=12).batch(ids, attn, mask)
    assert capped.teacher_inputs["input_ids"].shape[1] == 12 and 0 < capped.num_spans < a.num_spans
    assert T_t > 12


def test_distill_eval_aligns_another_tokenizer_and_refuses_one_it_cannot_align(zoo, tmp_path):
    from distill.errors import UserError
    from distill.evaluate import _load_tokenizers

    for name in ("bpe8k", "bpe1k", "unigram", "wordpiece"):
        zoo[name].save_pretrained(tmp_path / name)
    paths = {n: str(tmp_path / n) for n in ("bpe8k", "bpe1k", "unigram")}
    tokenizer, foreign = _load_tokenizers({"teacher": paths["bpe8k"], "same": paths["bpe8k"], "b": paths["bpe1k"],
                                           "u": paths["unigram"]})
    assert len(tokenizer) == len(zoo["bpe8k"]) and sorted(foreign) == ["b", "u"]
    assert len(foreign["u"][0]) == len(zoo["unigram"]) and foreign["u"][1].teacher_tokenizer is foreign["u"][0]
    with pytest.raises(UserError, match=r"model 'wp' is on another tokenizer.*WordPiece"):
        _load_tokenizers({"teacher": paths["bpe8k"], "wp": str(tmp_path / "wordpiece")})


# --------------------------------------------------------------------------------------------- chat templates


CHAT = [{"role": "user", "content": "Write a greeting with an emoji 😀 and some 中文"},
        {"role": "assistant", "content": "Héllo there 👋🏽, naïve friend. 你好！"},
        {"role": "user", "content": "And code?"},
        {"role": "assistant", "content": "def f(x):\n    return x  # done"}]


@pytest.mark.parametrize("pair", [("bpe1k", "chatml", "unigram", "inst"), ("unigram", "inst", "bpe8k", "chatml"),
                                  ("bpe1k", "chatml", "bpe8k", "chatml")])
def test_chat_rows_align_each_sides_own_template_on_the_assistant_text(zoo, pair):
    """Each side renders the conversation with its own template; the spans pair the assistant turns'
    text byte for byte, never template text, and cover the turns up to a first word whose leading
    space one template glues to it."""
    from distill.data.formats import chat_encoder, special_prefix
    from distill.teachers.cross import Aligner
    from tokenizer_zoo import with_chat_template

    s_name, s_style, t_name, t_style = pair
    student, teacher = with_chat_template(zoo[s_name], s_style), with_chat_template(zoo[t_name], t_style)
    encode = lambda tok: chat_encoder(tok, eos_id=tok.eos_token_id, prefix=special_prefix(tok))(CHAT, "row 0")  # noqa: E731
    (s_ids, s_labels), (t_ids, t_labels) = encode(student), encode(teacher)
    aligner = Aligner(teacher, student)
    got_ids, spans = aligner.chat_row(s_ids, s_labels, t_ids, t_labels)
    assert got_ids == t_ids  # the teacher reads its own rendering, not the student's
    sb, tb = aligner.student_bytes, aligner.teacher_bytes
    covered = b""
    for t0, t1, s0, s1 in spans:
        assert 1 <= s0 < s1 and 1 <= t0 < t1
        assert all(s_labels[j] != -100 for j in range(s0, s1))  # student side: supervised tokens only
        s_text = b"".join(sb[i] for i in s_ids[s0:s1]) if None not in [sb[i] for i in s_ids[s0:s1]] else None
        t_text = b"".join(tb[i] for i in t_ids[t0:t1]) if None not in [tb[i] for i in t_ids[t0:t1]] else None
        if s_text is None:  # the only special pair: EOS with EOS
            assert s_ids[s0:s1] == [student.eos_token_id] and t_ids[t0:t1] == [teacher.eos_token_id]
            continue
        assert s_text == t_text
        covered += s_text
    for turn in (CHAT[1]["content"], CHAT[3]["content"]):
        assert turn.split(" ", 1)[1].encode() in covered  # all but possibly the first word
    assert b"INST" not in covered and b"assistant" not in covered and b"greeting" not in covered
    same = s_name == t_name and s_style == t_style
    if same:
        assert s_ids == t_ids and all(t1 - t0 == 1 and s1 - s0 == 1 for t0, t1, s0, s1 in spans)
        assert {s0 for _, _, s0, _ in spans} == {j for j in range(len(s_ids)) if s_labels[j] != -100
                                                  and sb[s_ids[j]] is not None}


def test_align_texts_skips_leading_whitespace_and_stops_at_the_first_difference():
    from distill.teachers.cross import align_texts

    # student "ab|cd|e", teacher " |abc|d|e": after the teacher's leading space, common boundaries 0, 4, 5
    assert align_texts([b" ", b"abc", b"d", b"e"], [b"ab", b"cd", b"e"]) == [(1, 3, 0, 2), (3, 4, 2, 3)]
    # a teacher turn cut after "abc": only the common prefix, up to a boundary both have
    assert align_texts([b"ab", b"c"], [b"ab", b"cd", b"e"]) == [(0, 1, 0, 1)]
    assert align_texts([b"xy"], [b"ab"]) == [] and align_texts([], []) == []


def test_a_student_sample_on_a_chat_prompt_reaches_the_teacher_in_its_own_template(zoo):
    """On-policy rows: the teacher's own rendering of the prompt, then the sampled text in its tokens
    (cut before a special token and at the last whole character), then its EOS; the completion aligns."""
    from distill.batches import prompt_of
    from distill.data.formats import chat_encoder, special_prefix
    from distill.teachers.cross import Aligner
    from tokenizer_zoo import with_chat_template

    student, teacher = with_chat_template(zoo["bpe1k"], "chatml"), with_chat_template(zoo["unigram"], "inst")
    encode = lambda tok: chat_encoder(tok, eos_id=tok.eos_token_id, prefix=special_prefix(tok))(CHAT[:2], "row 0")  # noqa: E731
    (s_ids, s_labels), (t_ids, t_labels) = encode(student), encode(teacher)
    s_prompt, t_prompt = prompt_of(s_ids, s_labels), prompt_of(t_ids, t_labels)
    aligner = Aligner(teacher, student)
    sample = student("Sure: 😀 done", add_special_tokens=False)["input_ids"]
    im_end = student.convert_tokens_to_ids("<|im_end|>")
    ids, labels = aligner.sampled_row(t_prompt, sample + [im_end, 5, 6], ended=True)
    completion = ids[len(t_prompt):]
    assert ids[:len(t_prompt)] == t_prompt and all(x == -100 for x in labels[:len(t_prompt)])
    assert completion[-1] == teacher.eos_token_id and labels[len(t_prompt):] == completion
    assert teacher.decode(completion[:-1]) == "Sure: 😀 done"  # the text before the special token
    cut = aligner.sampled_row(t_prompt, sample[:-3], ended=False)[0][len(t_prompt):]  # "Sure: 😀" or a piece of it
    assert "\ufffd" not in teacher.decode(cut) and teacher.eos_token_id not in cut
    row = s_prompt + sample + [student.eos_token_id]
    _, spans = aligner.chat_row(row, [-100] * len(s_prompt) + sample + [student.eos_token_id], ids, labels)
    covered = b"".join(b"".join(aligner.student_bytes[t] for t in row[s0:s1]) for _, _, s0, s1 in spans
                       if row[s0] != student.eos_token_id)
    assert covered.endswith(b"done") and "😀".encode() in covered
    assert (len(ids) - 1, len(ids), len(row) - 1, len(row)) in spans  # EOS with EOS
