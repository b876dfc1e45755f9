"""`distill generate`: the teacher writes the data (sequence-level KD, verified chain-of-thought traces,
synthetic prompts), from a local model or an OpenAI-compatible server.

Layout of ``generate.output``::

    manifest.json          written last: teacher, every setting, the data's fingerprint, counts, speed
    generate.partial.json  while running: the header a re-run must match to continue
    prompts.jsonl          synthetic prompts only: what the teacher wrote as prompts (then completed)
    samples/chunk-00000.jsonl   every sample of prompts [0, chunk_size), kept or not, with its verdict;
                           written to a temporary name and renamed when complete (the unit of resume)
    data.jsonl | data.parquet   the training set: the kept samples as prompt/completion or chat rows
    data-logprobs.jsonl    HTTP log-probs only: the kept rows whose tokens are the run tokenizer's ...
    cache/                 ... and their teacher top-k as a `distill cache` folder for those rows

**Determinism and resume.** Sample s of prompt i is drawn with the seed ``row_seed(seed, i, s)`` and
a local teacher's rows never depend on their batch, so the same config gives byte-identical
``samples/`` and ``data`` files, and a killed run, re-run, skips the chunks that exist and writes
the rest: nothing duplicated, nothing lost. A re-run with other settings is refused.

**Prompts.** Rows of data.train: ``prompt_field`` (a prompt; a ``completion_field`` or the CoT
``answer_field`` alongside is the reference) or ``messages_field`` (chat: a final assistant turn
is the reference and is not sent). ``generate.template`` renders each prompt (``{prompt}`` and the
row's other columns); a local teacher sees ``special_prefix + tokens(prompt)`` (exactly what
training sees of a prompt_completion row) or the chat template with the generation prompt. A prompt
that does not fit the context with ``max_new_tokens`` is skipped, counted and named once.

**Chain of thought** (``generate.cot``): each sample's final answer is extracted
(``distill.traces``) and compared with the reference: kept only when correct (``verify``), then
``keep`` all / the first / the shortest / the likeliest (the teacher's highest mean log-probability per
token, temperature 1) per prompt; ``train_on: answer`` writes the answer line only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional

from distill import faults
from distill.errors import ConfigError, UserError

log = logging.getLogger(__name__)

FORMAT = "distill-generated"
VERSION = 1
MANIFEST = "manifest.json"
PARTIAL = "generate.partial.json"
PROMPTS = "prompts.jsonl"


# ---------------------------------------------------------------------------------------------
# Small file helpers


def _dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True)


def _write_atomic(path: Path, text: str, fault: str = "") -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if fault:
        faults.point(fault)
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def chunk_name(index: int) -> str:
    return f"chunk-{index:05d}.jsonl"


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclasses.dataclass
class Prompt:
    """One prompt: ``text`` (prompt formats) or ``messages`` (chat), and its reference if the data has one."""

    index: int
    text: Optional[str] = None
    messages: Optional[list[dict]] = None
    reference: Optional[str] = None


def _render(template: str, row: dict, prompt: str, where: str) -> str:
    fields = {k: v for k, v in row.items() if isinstance(v, (str, int, float))}
    fields["prompt"] = prompt
    try:
        return template.format_map(fields)
    except KeyError as e:
        raise ConfigError(f"generate.template uses {{{e.args[0]}}}, which {where} does not have (columns: "
                          f"{', '.join(sorted(fields))}); write literal braces as {{{{ and }}}}") from None
    except (ValueError, IndexError) as e:
        raise ConfigError(f"generate.template is not a valid format string ({e}); write literal braces as "
                          "{{ and }}") from None


def load_prompts(config, source: Optional[str] = None) -> tuple[list[Prompt], str]:
    """The prompts of ``source`` (default data.train) and the input kind ("prompt" or "chat")."""
    from distill.data.sources import DataError, load_raw, resolve_source

    d, g = config.data, config.generate
    src = resolve_source(source or d.train)
    raw = load_raw(src, split=d.train_split, hf_cache_dir=None)
    if g.max_prompts is not None:
        raw = raw.select(range(min(g.max_prompts, len(raw))))
    if len(raw) == 0:
        raise DataError(f"data is empty: {src.describe()} has no prompts")
    columns = raw.column_names
    chat = d.format == "chat" or (d.format == "auto" and d.messages_field in columns)
    if d.format in ("text",):
        raise ConfigError("distill generate needs prompts: data.format prompt, prompt_completion, chat or auto")
    field = d.messages_field if chat else d.prompt_field
    if field not in columns:
        raise DataError(f"{src.describe()} has no column {field!r} (the prompts); columns found: {columns}")
    ref_field = (g.cot.answer_field if g.cot is not None else d.completion_field)
    if g.cot is not None and ref_field not in columns:
        raise DataError(f"generate.cot needs the reference answers: {src.describe()} has no column {ref_field!r} "
                        f"(set generate.cot.answer_field); columns found: {columns}")
    prompts = []
    for i, row in enumerate(raw):
        reference = row.get(ref_field)
        if chat:
            messages = row[field]
            if not isinstance(messages, list) or not messages:
                raise DataError(f"{src.describe()} row {i + 1}: {field!r} must be a non-empty list of messages")
            messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
            if messages[-1].get("role") == "assistant":
                reference = reference if g.cot is not None else messages[-1].get("content")
                messages = messages[:-1]
            if not messages:
                raise DataError(f"{src.describe()} row {i + 1}: nothing before the assistant turn to prompt with")
            last = messages[-1]
            if last.get("role") == "user" and g.template != "{prompt}":
                messages[-1] = {**last, "content": _render(g.template, row, last.get("content") or "",
                                                          src.describe())}
            prompts.append(Prompt(i, messages=messages, reference=None if reference is None else str(reference)))
        else:
            text = row[field]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{src.describe()} row {i + 1}: field {field!r} must be a non-empty string")
            prompts.append(Prompt(i, text=_render(g.template, row, text, src.describe()),
                                  reference=None if reference is None else str(reference)))
    return prompts, "chat" if chat else "prompt"


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The token ids a local teacher continues (see the module docstring)."""
    from distill.data.formats import _plain_ids, chat_template_of, special_prefix

    if prompt.messages is None:
        return special_prefix(tokenizer) + _plain_ids(tokenizer, prompt.text)
    if chat_template_of(tokenizer) is not None:
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        return _plain_ids(tokenizer, text)
    # the chat format's fallback rendering ("role: content\n" per turn), then the assistant's header
    text = "".join(f"{m['role']}: {m.get('content', '')}\n" for m in prompt.messages) + "assistant: "
    return special_prefix(tokenizer) + _plain_ids(tokenizer, text)


# ---------------------------------------------------------------------------------------------
# Teachers


def _sampling(g):
    from distill.generation import SamplingSettings

    return SamplingSettings(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)


def _open_teacher(config, *, stop):
    """(teacher, tokenizer or None, description for the manifest)."""
    g, t = config.generate, config.teacher
    if t.source == "http":
        from distill.teachers.http import HTTPTeacher

        h = t.http
        teacher = HTTPTeacher(h.url, model=h.model, api=h.api, api_key_env=h.api_key_env, concurrency=h.concurrency,
                              timeout=h.timeout, max_retries=h.max_retries, logprobs=h.logprobs,
                              max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                              stop=stop)
        return teacher, None, teacher.describe()
    import torch

    from distill import build, models
    from distill.cache.format import weights_sha256
    from distill.teachers.live import LiveGenerator

    tokenizer = models.load_tokenizer(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code)
    model = build.load_teacher(config)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    teacher = LiveGenerator(model, tokenizer, settings=_sampling(g), batch_size=g.batch_size, stop=stop,
                            score=g.cot is not None and g.cot.keep == "likeliest")
    desc = {"kind": "local", "model": t.model, "revision": t.revision,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "weights_sha256": weights_sha256(model)}
    return teacher, tokenizer, desc


def _requests(teacher, tokenizer, prompts: list[Prompt], *, samples: int, seed: int, api: str):
    """[(prompt, sample, Request or the reason it is skipped)] for these prompts."""
    from distill.generation import row_seed
    from distill.teachers.http import Request

    out = []
    for p in prompts:
        if tokenizer is not None:
            ids = prompt_ids(tokenizer, p)
            fits = teacher.fits(ids)
        for s in range(samples):
            seed_s = row_seed(seed, p.index, s)
            if tokenizer is not None:
                out.append((p, s, Request(prompt=ids, seed=seed_s) if fits else "too_long"))
            elif api == "chat":
                out.append((p, s, Request(messages=p.messages or [{"role": "user", "content": p.text}], seed=seed_s)))
            else:
                if p.messages is not None:
                    raise ConfigError("chat data needs teacher.http.api=chat (the completions API takes a text prompt)")
                out.append((p, s, Request(prompt=p.text, seed=seed_s)))
    return out


# ---------------------------------------------------------------------------------------------
# The verb


class Progress:
    """A tqdm bar over samples with tokens/s (or nothing when disabled)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.tokens, self.tic = 0, time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="sample", desc="generate", file=sys.stderr,
                            dynamic_ncols=True)

    def __call__(self, reply) -> None:
        self.tokens += reply.completion_tokens or 0
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.tic, 1e-9):.0f} tok/s",
                                     refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def generate(config, overrides: Optional[list[str]] = None, *, progress: bool = True) -> dict:
    """`distill generate` as ``config`` says (a Config, dict or YAML path); returns the manifest."""
    from distill.config import load_config

    config = load_config(config, overrides, stage="generate")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("distill generate runs in one process (under accelerate launch every process would write "
                        "the same chunks); to use several GPUs, serve the teacher (vLLM, SGLang) and set teacher.http "
                        "with a higher concurrency")
    g, t = config.generate, config.teacher
    out = Path(g.output)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob(".tmp-*")) + list((out / "samples").glob(".tmp-*")):
        stale.unlink()  # a killed run's half-written file: never renamed, never read
    api = t.http.api if t.source == "http" else "local"

    stop = list(g.stop)
    teacher, tokenizer, teacher_desc = _open_teacher(config, stop=stop)
    synthetic = None
    if g.synthetic is not None:
        synthetic = synthesize_prompts(config, out, teacher, tokenizer, teacher_desc, progress=progress)
        prompts, kind = load_prompts(config, str(out / PROMPTS))
    else:
        prompts, kind = load_prompts(config)
    output_format = g.output_format
    if output_format == "auto":
        output_format = "chat" if kind == "chat" or api == "chat" else "prompt_completion"
    if output_format == "prompt_completion" and (kind == "chat" or api == "chat"):
        raise ConfigError("generate.output_format=prompt_completion needs text prompts sent as text: chat data or "
                          "teacher.http.api=chat make chat rows (output_format chat)")

    header = _header(config, teacher_desc, prompts, kind, output_format)
    _check_resume(out, header)
    _write_atomic(out / PARTIAL, json.dumps(header, indent=2, sort_keys=True) + "\n")

    chunks = math.ceil(len(prompts) / g.chunk_size)
    (out / "samples").mkdir(exist_ok=True)
    done_chunks = [c for c in range(chunks) if (out / "samples" / chunk_name(c)).exists()]
    bar = Progress(len(prompts) * g.num_samples, len(done_chunks) * g.chunk_size * g.num_samples, progress)
    generated_tokens, written_now = 0, 0
    tic = time.perf_counter()
    try:
        for c in range(chunks):
            path = out / "samples" / chunk_name(c)
            if path.exists():
                continue
            part = prompts[c * g.chunk_size:(c + 1) * g.chunk_size]
            rows = _chunk_rows(teacher, tokenizer, part, g, api=api, progress=bar)
            generated_tokens += sum(r.get("completion_tokens") or 0 for r in rows)
            _write_atomic(path, "".join(_dumps(r) + "\n" for r in rows), fault="gen-chunk")
            written_now += 1
            faults.point("gen-chunk-done")
    finally:
        bar.close()
    seconds_now = time.perf_counter() - tic

    samples = [r for c in range(chunks) for r in _read_jsonl(out / "samples" / chunk_name(c))]
    kept, counts = select_rows(samples, g)
    if not kept:
        shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v and k != "kept")
        raise UserError(f"no sample was kept, so there is no training data ({shown}); the samples are in "
                        f"{out / 'samples'} (a verifier that rejects everything? prompts that are all too long?)")
    data_path = out / f"data.{g.format}"
    rows = [training_row(r, output_format, g) for r in kept]
    write_dataset(data_path, rows, g.format)
    new_samples = sum(len(prompts[c * g.chunk_size:(c + 1) * g.chunk_size]) for c in range(chunks)
                      if c not in done_chunks) * g.num_samples
    manifest = {**header, "counts": counts, "data": data_path.name, "synthetic": synthetic,
                "run": {"chunks": chunks, "chunks_written_now": written_now, "samples_now": new_samples,
                        "generated_tokens_now": generated_tokens, "seconds_now": round(seconds_now, 3),
                        "samples_per_s_now": round(new_samples / max(seconds_now, 1e-9), 3),
                        "tokens_per_s_now": round(generated_tokens / max(seconds_now, 1e-9), 1),
                        "retries_now": getattr(teacher, "retries", 0)}}
    warnings = _warnings(counts, samples)
    if t.source == "http" and t.http.logprobs:
        manifest["logprobs"] = write_logprob_cache(config, out, kept, teacher_desc, warnings)
    manifest["warnings"] = warnings
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n", fault="gen-manifest")
    (out / PARTIAL).unlink(missing_ok=True)
    return {**manifest, "dir": str(out)}


def _chunk_rows(teacher, tokenizer, prompts, g, *, api, progress) -> list[dict]:
    todo = _requests(teacher, tokenizer, prompts, samples=g.num_samples, seed=g.seed, api=api)
    asked = [r for _, _, r in todo if not isinstance(r, str)]
    replies = iter(teacher.generate(asked, progress=progress) if asked else [])
    rows = []
    for p, s, request in todo:
        row = {"prompt_index": p.index, "sample": s}
        if p.messages is not None:
            row["messages"] = p.messages
        else:
            row["prompt"] = p.text
        if p.reference is not None:
            row["reference"] = p.reference
        if isinstance(request, str):
            row.update(error=request, completion=None, finish_reason=None, completion_tokens=0)
            if progress is not None:
                from distill.teachers.http import Reply
                progress(Reply())
        else:
            reply = next(replies)
            row.update(completion=reply.text if reply.error is None else None, finish_reason=reply.finish_reason,
                       completion_tokens=reply.completion_tokens or 0)
            if reply.error is not None:
                row["error"] = "too_long" if "context" in reply.error.lower() or "long" in reply.error.lower() \
                    else "server"
                row["error_message"] = reply.error
            if reply.tokens is not None:
                row["tokens"], row["top_logprobs"] = reply.tokens, reply.top_logprobs
            if reply.mean_logprob is not None:
                row["mean_logprob"] = reply.mean_logprob
        if g.cot is not None and row.get("completion") is not None:
            from distill.traces import extract_answer, verdict

            if p.reference is not None:
                row["verdict"], row["answer"] = verdict(row["completion"], p.reference, g.cot.answer_pattern)
            else:
                row["answer"] = extract_answer(row["completion"], g.cot.answer_pattern)
                row["verdict"] = "unparseable" if row["answer"] is None else "unverified"
        rows.append(row)
    return rows


def select_rows(samples: list[dict], g) -> tuple[list[dict], dict]:
    """The samples the training set keeps, and the counts of why the others are not kept."""
    counts = {"prompts": len({r["prompt_index"] for r in samples}), "samples": len(samples), "kept": 0,
              "too_long": 0, "server_errors": 0, "unfinished_dropped": 0, "unfinished_kept": 0, "empty": 0}
    if g.cot is not None:
        counts.update(correct=0, wrong=0, unparseable=0, unverified=0, not_chosen=0)
    by_prompt: dict[int, list[dict]] = {}
    for r in samples:
        if r.get("error") == "too_long":
            counts["too_long"] += 1
            continue
        if r.get("error") is not None:
            counts["server_errors"] += 1
            continue
        if g.cot is not None:
            counts[r["verdict"]] += 1
        if r["finish_reason"] == "length":
            if not g.keep_unfinished:
                counts["unfinished_dropped"] += 1
                continue
        if not (r["completion"] or "").strip():
            counts["empty"] += 1
            continue
        if g.cot is not None:
            if g.cot.verify and r["verdict"] != "correct":
                continue
            if g.cot.train_on == "answer" and r.get("answer") is None:
                continue
        if r["finish_reason"] == "length":
            counts["unfinished_kept"] += 1
        by_prompt.setdefault(r["prompt_index"], []).append(r)
    kept = []
    for index in sorted(by_prompt):
        group = by_prompt[index]
        if g.cot is not None and g.cot.keep == "first":
            group = group[:1]
        elif g.cot is not None and g.cot.keep == "shortest":
            group = [min(group, key=lambda r: (r["completion_tokens"] or len(r["completion"]), r["sample"]))]
        elif g.cot is not None and g.cot.keep == "likeliest":
            group = [max(group, key=lambda r: (r.get("mean_logprob", -math.inf), -r["sample"]))]
        if g.cot is not None:
            counts["not_chosen"] += len(by_prompt[index]) - len(group)
        kept += group
    counts["kept"] = len(kept)
    counts["prompts_kept"] = len({r["prompt_index"] for r in kept})
    return kept, counts


def training_row(r: dict, output_format: str, g) -> dict:
    """A kept sample as a row `distill train` reads (plus where it came from)."""
    completion = r["completion"]
    if g.cot is not None and g.cot.train_on == "answer":
        completion = g.cot.answer_format.format(answer=r["answer"])
    meta = {"prompt_index": r["prompt_index"], "sample": r["sample"], "finish_reason": r["finish_reason"]}
    if output_format == "chat":
        messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        return {"messages": [*messages, {"role": "assistant", "content": completion}], **meta}
    return {"prompt": r["prompt"], "completion": completion, **meta}


def write_dataset(path: Path, rows: list[dict], kind: str) -> None:
    if kind == "jsonl":
        _write_atomic(path, "".join(_dumps(r) + "\n" for r in rows))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows), tmp, compression="zstd")
    os.replace(tmp, path)


def _warnings(counts: dict, samples: list[dict]) -> list[str]:
    out = []
    if counts["too_long"]:
        first = sorted({r["prompt_index"] for r in samples if r.get("error") == "too_long"})[:3]
        out.append(f"{counts['too_long']} samples skipped: their prompt and max_new_tokens do not fit the teacher's "
                   f"context (prompts {', '.join(str(i + 1) for i in first)}{', ...' if counts['too_long'] > 3 else ''})")
    if counts["server_errors"]:
        out.append(f"{counts['server_errors']} samples got an error from the server")
    if counts["unfinished_dropped"]:
        out.append(f"{counts['unfinished_dropped']} samples reached max_new_tokens and were dropped "
                   "(generate.keep_unfinished=false)")
    return out


# ---------------------------------------------------------------------------------------------
# Header and resume


def _header(config, teacher_desc: dict, prompts: list[Prompt], kind: str, output_format: str) -> dict:
    g = config.generate
    settings = dataclasses.asdict(g)
    settings.pop("output")
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(_dumps(dataclasses.asdict(p)).encode())
        digest.update(b"\n")
    d = config.data
    return {"format": FORMAT, "version": VERSION, "teacher": teacher_desc, "settings": settings,
            "prompts": {"source": str(d.train) if g.synthetic is None else PROMPTS, "count": len(prompts),
                        "kind": kind, "sha256": digest.hexdigest(),
                        "fields": [d.prompt_field, d.completion_field, d.messages_field]},
            "output_format": output_format,
            "sampling_seed": "row_seed(generate.seed, prompt_index, sample)"}


def _check_resume(out: Path, header: dict) -> None:
    recorded = None
    for name in (MANIFEST, PARTIAL):
        if (out / name).exists():
            try:
                recorded = json.loads((out / name).read_text())
            except json.JSONDecodeError:
                recorded = None
            break
    if recorded is None:
        if any((out / "samples").glob("chunk-*.jsonl")):
            raise UserError(f"{out} holds generated chunks but no {PARTIAL} or {MANIFEST}: use a new generate.output "
                            "or delete that folder")
        return
    if recorded.get("format") != FORMAT:
        raise UserError(f"{out} is not a `distill generate` folder; use a new generate.output")
    old = {k: recorded.get(k) for k in header}
    changed = []
    for key in header:
        a, b = old[key], header[key]
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [f"{key}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
        elif a != b:
            changed.append(key)
    if changed:
        raise UserError(f"{out} holds data generated with other settings ({', '.join(changed[:4])} changed); use a "
                        "new generate.output, or delete that folder to start over")


# ---------------------------------------------------------------------------------------------
# Synthetic prompts


def _with_settings(teacher, *, stop, max_new_tokens: int, temperature: float):
    """The same teacher (the model in memory, or the endpoint) with other sampling settings."""
    import copy

    from distill.teachers.live import LiveGenerator

    if isinstance(teacher, LiveGenerator):
        settings = dataclasses.replace(teacher.settings, max_new_tokens=max_new_tokens, temperature=temperature)
        return LiveGenerator(teacher.model, teacher.tokenizer, settings=settings, batch_size=teacher.batch_size,
                             stop=stop, autocast=teacher.autocast)
    other = copy.copy(teacher)
    other.settings = {**teacher.settings, "max_tokens": max_new_tokens, "temperature": temperature, "stop": list(stop)}
    return other


def synthesize_prompts(config, out: Path, teacher, tokenizer, teacher_desc: dict, *, progress: bool) -> dict:
    """Write ``out/prompts.jsonl``: prompts the teacher writes from the seed examples and topics, without
    near-duplicates (of each other and of the examples). Returns its counts (also kept in
    ``synthetic.json``); an existing complete file is reused."""
    from distill.generation import row_seed
    from distill.teachers.http import Request
    from distill.traces import NearDuplicates

    s, g = config.generate.synthetic, config.generate
    done = out / "synthetic.json"
    settings = dataclasses.asdict(s)
    if done.exists() and (out / PROMPTS).exists():
        info = json.loads(done.read_text())
        if info.get("settings") != settings or info.get("teacher") != teacher_desc:
            raise UserError(f"{out} holds synthetic prompts made with other settings; use a new generate.output, or "
                            "delete that folder to start over")
        return info
    teacher = _with_settings(teacher, stop=[s.separator], max_new_tokens=s.max_new_tokens, temperature=s.temperature)
    api = config.teacher.http.api if config.teacher.source == "http" else "local"
    seen = NearDuplicates(s.ngram, s.max_overlap)
    for example in s.examples:
        seen.add(example)
    kept: list[str] = []
    counts = {"requests": 0, "kept": 0, "empty": 0, "too_short": 0, "duplicate": 0, "overlap": 0, "unfinished": 0}
    limit = s.max_requests or 4 * s.num_prompts
    bar = Progress(s.num_prompts, 0, progress)
    try:
        while len(kept) < s.num_prompts and counts["requests"] < limit:
            batch = min(limit - counts["requests"], max(g.batch_size, 2 * (s.num_prompts - len(kept))))
            requests = []
            for a in range(counts["requests"], counts["requests"] + batch):
                rng = random.Random(row_seed(g.seed, -1, a))
                shown = rng.sample(s.examples, min(s.examples_per_request, len(s.examples)))
                topic = rng.choice(s.topics) if s.topics else ""
                text = s.template.format(examples=s.separator.join(shown), topic=topic,
                                         topic_clause=f" about {topic}" if topic else "")
                p = Prompt(a, text=text)
                seed = row_seed(g.seed, -2, a)
                if tokenizer is not None:
                    requests.append(Request(prompt=prompt_ids(tokenizer, p), seed=seed))
                elif api == "chat":
                    requests.append(Request(messages=[{"role": "user", "content": text}], seed=seed))
                else:
                    requests.append(Request(prompt=text, seed=seed))
            counts["requests"] += batch
            for reply in teacher.generate(requests):
                text = (reply.text or "").split(s.separator)[0].strip()
                if reply.error is not None or not text:
                    counts["empty"] += 1
                elif reply.finish_reason == "length":
                    counts["unfinished"] += 1  # cut by max_new_tokens: not a whole prompt
                elif len(text) < s.min_chars:
                    counts["too_short"] += 1
                elif (why := seen.reason(text)) is not None:
                    counts[why] += 1
                elif len(kept) < s.num_prompts:
                    seen.add(text)
                    kept.append(text)
                    bar.bar is not None and bar.bar.update(1)
    finally:
        bar.close()
    counts["kept"] = len(kept)
    if not kept:
        raise UserError(f"the teacher wrote no usable prompt in {counts['requests']} requests ({counts}); check "
                        "generate.synthetic (examples, template, max_new_tokens, separator)")
    _write_atomic(out / PROMPTS, "".join(_dumps({"prompt": p}) + "\n" for p in kept))
    info = {"settings": settings, "teacher": teacher_desc, "counts": counts}
    _write_atomic(done, json.dumps(info, indent=2, sort_keys=True) + "\n")
    if len(kept) < s.num_prompts:
        log.warning("synthetic prompts: %d of %d kept after %d requests", len(kept), s.num_prompts, counts["requests"])
    return info


# ---------------------------------------------------------------------------------------------
# HTTP log-probs as a teacher cache


def token_map(tokenizer) -> dict[str, int]:
    """{token text: id} for the tokens whose decoded text is whole (valid UTF-8) and unique in the vocabulary:
    how a server's token strings are turned back into ids."""
    special = set(tokenizer.all_special_ids)
    texts: dict[str, list[int]] = {}
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text and "\ufffd" not in text:
            texts.setdefault(text, []).append(i)
    return {t: ids[0] for t, ids in texts.items() if len(ids) == 1}


def write_logprob_cache(config, out: Path, kept: list[dict], teacher_desc: dict, warnings: list[str]) -> dict:
    """The kept rows whose server tokens are exactly the run tokenizer's tokens of the completion, as
    ``data-logprobs.jsonl``, and their top-k log-probs as a teacher cache in ``cache/`` (the format of
    `distill cache`, float32 values) for `distill train` with teacher.source=cache. Position j of a
    completion holds the server's top-k for its token j; the EOS position after it holds no target
    (the server does not report the step that ended the text). Top-k entries whose text is not one
    whole token of the tokenizer join the tail bucket."""
    import numpy as np

    from distill import models
    from distill.cache.format import encode, shard_info, shard_name, value_encoding, write_json, write_shard
    from distill.cache.writer import TargetSpec, make_header
    from distill.data import load_tokenized, tokenizer_fingerprint
    from distill.data.formats import _plain_ids

    c = config
    name = c.student.tokenizer or c.student.model
    info = {"rows": 0, "mismatched_tokens": 0, "without_logprobs": 0}
    if c.generate.cot is not None and c.generate.cot.train_on == "answer":
        warnings.append("log-probs are not kept with generate.cot.train_on=answer (the answer line is not what the "
                        "teacher wrote token by token)")
        return info
    if name is None:
        warnings.append("teacher.http.logprobs: no cache written, set student.tokenizer (the tokenizer the server's "
                        "tokens are checked against)")
        return info
    if any("messages" in r for r in kept):
        warnings.append("teacher.http.logprobs: chat rows keep their text only (the cache is for prompt_completion "
                        "rows, from the completions API)")
        return info
    tokenizer = models.load_tokenizer(name, revision=c.student.revision, trust_remote_code=c.student.trust_remote_code)
    lookup = token_map(tokenizer)
    aligned = []
    for r in kept:
        if r.get("tokens") is None:
            info["without_logprobs"] += 1
            continue
        ids = [lookup.get(tok) for tok in r["tokens"]]
        if None in ids or "".join(r["tokens"]) != r["completion"] or _plain_ids(tokenizer, r["completion"]) != ids:
            info["mismatched_tokens"] += 1
            continue
        aligned.append((r, ids))
    if info["mismatched_tokens"]:
        warnings.append(f"{info['mismatched_tokens']} of {len(kept)} kept samples: the server's tokens are not the "
                        f"tokenizer {name}'s tokens of their text; they keep their text only (no log-probs)")
    info["rows"] = len(aligned)
    if not aligned:
        return info
    path = out / "data-logprobs.jsonl"
    _write_atomic(path, "".join(_dumps(training_row(r, "prompt_completion", c.generate)) + "\n" for r, _ in aligned))
    d = c.data
    dataset = load_tokenized(str(path), tokenizer=tokenizer, format="prompt_completion", max_length=d.max_length,
                             packing=False, cache_dir=None)
    if len(dataset) != len(aligned):
        warnings.append(f"teacher.http.logprobs: {len(aligned) - len(dataset)} rows have no supervised token within "
                        f"data.max_length={d.max_length}: no cache written")
        return info
    k = max(max((len(t) for t in r["top_logprobs"]), default=1) for r, _ in aligned)
    encoding = value_encoding("topk", "float32", None)
    spec = TargetSpec("topk", k, 1.0, encoding)
    rows = []
    for index, ((r, ids), labels) in enumerate(zip(aligned, dataset["labels"])):
        positions = sum(1 for x in labels[1:] if x != -100)
        top_ids = np.zeros((positions, k), dtype=np.int64)
        top_lp = np.full((positions, k), -np.inf)
        tail = np.full(positions, -np.inf)
        for j in range(min(positions, len(ids))):
            entries = [(lookup[tok], lp) for tok, lp in r["top_logprobs"][j].items() if tok in lookup]
            if ids[j] not in {i for i, _ in entries}:  # the sampled token is always in the list
                entries.append((ids[j], -math.inf))
            for slot, (i, lp) in enumerate(entries[:k]):
                top_ids[j, slot], top_lp[j, slot] = i, lp
            mass = float(np.exp(top_lp[j]).sum())
            if mass > 1.0:  # rounding of the server's numbers: renormalize
                top_lp[j] -= math.log(mass)
                mass = 1.0
            tail[j] = math.log(1.0 - mass) if mass < 1.0 - 1e-7 else -math.inf
        rows.append({"example": index, "positions": positions,
                     **encode(top_ids, top_lp, tail, vocab_size=len(tokenizer), encoding=encoding)})
    folder = out / "cache"
    folder.mkdir(exist_ok=True)
    header = make_header(teacher_info=teacher_desc, tokenizer_sha256=tokenizer_fingerprint(tokenizer),
                         vocab_size=len(tokenizer), dataset=dataset,
                         data_info={"train": str(path), "format": "prompt_completion", "max_length": d.max_length,
                                    "packing": False, "max_train_examples": None, "source": "http logprobs"},
                         spec=spec, shard_size=1024, batch_size=1)
    shards = []
    for s in range(header["num_shards"]):
        shard = folder / shard_name(s)
        write_shard(shard, rows[s * 1024:(s + 1) * 1024])
        shards.append(shard_info(shard, s, s * 1024))
    positions, size = sum(x["positions"] for x in shards), sum(x["bytes"] for x in shards)
    write_json(folder / "manifest.json", {**header, "shards": shards, "totals": {
        "positions": positions, "bytes": size, "bytes_per_position": round(size / max(positions, 1), 3)}})
    info.update(cache="cache", data="data-logprobs.jsonl", k=k, positions=positions)
    return info
