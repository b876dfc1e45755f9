"""llama.cpp in-process (llama-cpp-python): quantize a GGUF, score text with it, sample from it.

Scoring uses ``Llama(..., logits_all=True)`` and reads the logits of every evaluated position
directly (``Llama.scores``): position t holds the distribution of token t+1. (llama.cpp's server
``echo`` log-probs are shifted by one position upstream; they are not used.)
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from torch import nn

from distill.errors import UserError
from distill.export.check import hf_logprobs, log_softmax, logprob_stats


def _ftypes() -> dict:
    import llama_cpp

    return {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
            "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M, "q5_k_s": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_S,
            "q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1, "q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
            "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q4_k_s": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
            "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
            "q3_k_l": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_L, "q3_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
            "q3_k_s": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_S, "q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K}


def quantize(src: Path, dst: Path, quant: str, threads: Optional[int] = None) -> None:
    """``llama-quantize src dst quant`` through the library binding (no binary needed)."""
    import llama_cpp

    llama_cpp.llama_backend_init()  # idempotent; quantizing without it crashes
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftypes()[quant]
    params.nthread = threads or os.cpu_count() or 1
    with _quiet():
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if status != 0:
        raise UserError(f"llama.cpp could not quantize {src} to {quant} (status {status})")


@contextlib.contextmanager
def _quiet():
    """Silence llama.cpp's C-level logging on stderr (file descriptor 2) for the block."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _without_weight_repacking():
    """Load with llama.cpp's extra CPU buffer types (weight repacking) off.

    With them on, llama.cpp 0.3.36's AMX repacking of q8_0 weights crashes (SIGSEGV) in the first
    decode on this machine's Xeon (AMX-capable); plain CPU buffers score identically. llama-cpp-python
    does not expose ``use_extra_bufts``, so the default-parameters factory its constructor calls is
    wrapped for the duration of the constructor."""
    import llama_cpp.llama as module

    original = module.llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_cpp.llama_model_default_params = original


class GGUFModel:
    """A GGUF file loaded in llama.cpp, for scoring and sampling.

    ``n_ctx`` bounds the tokens of one evaluation; ``threads`` defaults to the CPU count."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 512, threads: Optional[int] = None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError("GGUF models need llama-cpp-python: pip install llama-cpp-python "
                            "(or pip install 'distill[export]')") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        threads = threads or os.cpu_count() or 1
        try:
            with _quiet(), _without_weight_repacking():
                self.llm = Llama(str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                 n_threads=threads, n_threads_batch=threads, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"llama.cpp could not load {path}: {e}") from None
        self.n_ctx = n_ctx
        self.vocab_size = self.llm.n_vocab()
        meta = self.llm.metadata
        self.context_length = int(meta.get(f"{meta.get('general.architecture', 'llama')}.context_length", n_ctx))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS, special tokens in the text parsed as such (as the HF
        tokenizer does)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)) if text else []

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Float32 logits of every position of ``ids``: row t is the distribution of token t+1.
        Shapes: (T,) -> (T, V)."""
        if len(ids) > self.n_ctx:
            raise UserError(f"{len(ids)} tokens exceed the llama.cpp context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def sample(self, prompt: Sequence[int], *, max_new_tokens: int, seed: int, eos_token_id: Optional[int],
               ignore_eos: bool = False) -> tuple[list[int], bool]:
        """One completion at temperature 1 from the full distribution (no top-k / top-p), drawn with
        numpy from llama.cpp's logits: (ids before the first EOS, whether EOS was drawn)."""
        rng = np.random.default_rng(seed)
        budget = min(max_new_tokens, self.n_ctx - len(prompt))
        self.llm.reset()
        self.llm.eval(list(prompt))
        out: list[int] = []
        for _ in range(budget):
            logits = np.asarray(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64)
            if ignore_eos and eos_token_id is not None:
                logits[eos_token_id] = -np.inf
            probs = np.exp(logits - logits.max())
            token = int(rng.choice(len(probs), p=probs / probs.sum()))
            if token == eos_token_id and not ignore_eos:
                return out, True
            out.append(token)
            self.llm.eval([token])
        return out, False

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """``max_new_tokens`` tokens by argmax of llama.cpp's logits (EOS not a stop)."""
        self.llm.reset()
        self.llm.eval(list(prompt))
        out = []
        for _ in range(min(max_new_tokens, self.n_ctx - len(prompt))):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([out[-1]])
        return out

    def generate_tokens_per_s(self, prompt: Sequence[int], max_new_tokens: int) -> float:
        """Tokens per second of llama.cpp's own greedy decoding loop at batch 1 (EOS not a stop)."""
        budget = min(max_new_tokens, self.n_ctx - len(prompt))
        start, made = time.perf_counter(), 0
        for _ in self.llm.generate(list(prompt), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
            made += 1
            if made >= budget:
                break
        return made / (time.perf_counter() - start)

    def close(self) -> None:
        self.llm.close()


def compare_with_hf(gguf_path: Path, folder: Path, strings: Sequence[str], text: str) -> dict:
    """What llama.cpp does differently from transformers with this GGUF and its source folder:
    the test strings it tokenizes differently, and on ``text`` (tokenized by HF) the next-token
    log-probabilities: mean / 95th-percentile / max |Δ log p| of the observed tokens, mean KL(HF ‖
    GGUF) and top-1 agreement over every position."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    model = GGUFModel(gguf_path, n_ctx=max(64, 1 << (len(ids) - 1).bit_length()))
    try:
        mismatches = [s for s in strings if model.tokenize(s) != list(tokenizer(s, add_special_tokens=False)
                                                                          ["input_ids"])]
        ours = log_softmax(model.logits(ids))  # (T, V)
    finally:
        model.close()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {"tokenizer_strings": len(strings), "tokenizer_mismatches": mismatches,
            **logprob_stats(hf_logprobs(hf, ids), ours, ids)}


class GGUFCausalLM(nn.Module):
    """A GGUF file behind the small part of the HF causal-LM interface that ``distill eval`` uses
    for scoring: ``forward(input_ids, attention_mask).logits`` (each row evaluated separately by
    llama.cpp, padding positions left at 0), ``config.max_position_embeddings`` and no plain
    linear head (so eval takes the dense-logits path). Sampling and timing are its own methods:
    llama.cpp decodes one sequence at a time here."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int):
        from types import SimpleNamespace

        super().__init__()
        self.gguf = GGUFModel(path, n_ctx=n_ctx)
        self.config = SimpleNamespace(max_position_embeddings=self.gguf.context_length)
        self.vocab_size = self.gguf.vocab_size
        self.n_params = int(self.gguf.llm._model.n_params())

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, attention_mask=None):
        import torch
        from types import SimpleNamespace

        out = torch.zeros(*input_ids.shape, self.vocab_size)  # (B, T, V)
        lengths = attention_mask.sum(-1).tolist() if attention_mask is not None else [input_ids.shape[1]] * len(
            input_ids)
        for row, (ids, length) in enumerate(zip(input_ids.tolist(), lengths)):
            out[row, :length] = torch.from_numpy(self.gguf.logits(ids[:length]))
        return SimpleNamespace(logits=out)

    def sample_completions(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seeds: Sequence[int],
                           eos_token_id: Optional[int]) -> list[tuple[list[int], bool]]:
        return [self.gguf.sample(p, max_new_tokens=max_new_tokens, seed=s, eos_token_id=eos_token_id)
                for p, s in zip(prompts, seeds)]

    def speed(self, prompts: Sequence[Sequence[int]], blocks: Sequence[Sequence[int]], *, max_new_tokens: int) -> dict:
        """Generation tokens/s at batch 1 (llama.cpp's greedy loop; median over up to 3 prompts,
        after a warm-up) and forward tokens/s over data blocks (median of at least 3). No batched
        generation: ``generate_tokens_per_s_batched`` is None."""
        from distill.evaluate import _median

        self.gguf.generate_tokens_per_s(prompts[0], max_new_tokens)  # warm-up
        rates = [self.gguf.generate_tokens_per_s(p, max_new_tokens) for p in prompts[:3]]
        forward = []
        self.gguf.logits(blocks[0])
        while len(forward) < 3:
            for ids in blocks:
                start = time.perf_counter()
                self.gguf.logits(ids)
                forward.append(len(ids) / (time.perf_counter() - start))
        return {"generate_tokens_per_s_batch1": _median(rates), "generate_tokens_per_s_batched": None,
                "forward_tokens_per_s": _median(forward)}

    def close(self) -> None:
        self.gguf.close()
