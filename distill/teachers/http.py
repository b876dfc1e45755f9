"""The teacher behind an OpenAI-compatible HTTP endpoint: generated text, and log-probs where given.

vLLM, llama.cpp's server, SGLang, TGI, Ollama and hosted APIs speak ``/v1/completions`` (a text
prompt, or token ids) and ``/v1/chat/completions`` (messages). ``HTTPTeacher.generate`` sends one
request per (prompt, sample), at most ``concurrency`` in flight, and returns the replies in order.

- **Retries.** A refused connection, a timeout, 429, 5xx or a reply that is not the JSON an
  OpenAI-compatible server sends is retried up to ``max_retries`` times with exponential backoff
  (``Retry-After`` honoured); then one ``EndpointError`` line says what failed.
- **4xx is the user's.** Any other 4xx (a wrong model name, a bad key, a bad setting) is an
  ``EndpointError`` with the server's message, at once: retrying cannot fix it. A prompt longer
  than the server's context is the exception: that reply is returned with ``error`` set, so one
  prompt is skipped (and counted) rather than the run ended.
- **The API key** is read from the environment variable the config names and sent as a Bearer
  token; it is never part of ``describe()`` (what manifests record) or of an error message.
- **Log-probs.** With ``logprobs=k`` the reply's generated tokens and their top-k log-probs are
  kept (``tokens``, ``top_logprobs``: one {token string: log p} per generated token, as the
  completions API gives them; chat replies are converted to that shape), and ``mean_logprob``,
  the mean log-probability of the generated tokens.
- **Seeds.** Each request carries its own ``seed``: servers that honour it (vLLM, llama.cpp) give
  the same text for the same request, whatever the concurrency.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import requests

from distill.errors import UserError

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
CONTEXT_WORDS = ("context length", "context window", "maximum context", "too long", "exceeds", "exceed the",
                 "n_ctx", "prompt is too", "maximum sequence length", "input length")
MAX_BACKOFF = 8.0


class EndpointError(UserError):
    """The server cannot answer: unreachable after the retries, a 4xx, or replies that are not OpenAI-shaped."""


@dataclass
class Request:
    """One completion to ask for: ``prompt`` (text or token ids) for the completions API, or ``messages``."""

    prompt: Union[str, list[int], None] = None
    messages: Optional[list[dict]] = None
    seed: int = 0


@dataclass
class Reply:
    """What the server wrote. ``error``: why there is no text (a prompt longer than the context)."""

    text: str = ""
    finish_reason: Optional[str] = None
    completion_tokens: Optional[int] = None
    tokens: Optional[list[str]] = None
    top_logprobs: Optional[list[dict[str, float]]] = None
    mean_logprob: Optional[float] = None  # the teacher's mean log p per generated token (temperature 1), if known
    error: Optional[str] = None
    attempts: int = 1


def base_url(url: str) -> str:
    """``url`` without a trailing slash, ending in /v1 (added when missing)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class HTTPTeacher:
    """An OpenAI-compatible endpoint; sampling settings are fixed at construction (see the module docstring)."""

    def __init__(self, url: str, *, model: Optional[str] = None, api: str = "completions",
                 api_key_env: Optional[str] = None, concurrency: int = 4, timeout: float = 300.0,
                 max_retries: int = 6, logprobs: int = 0, backoff: float = 0.5, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = ()):
        if api not in ("completions", "chat"):
            raise ValueError(f"api must be completions or chat, got {api!r}")
        self.url, self.api, self.concurrency, self.timeout = base_url(url), api, concurrency, timeout
        self.max_retries, self.logprobs, self.backoff = max_retries, logprobs, backoff
        self.settings = dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=list(stop))
        if top_k:
            self.settings["top_k"] = top_k  # not OpenAI's, but vLLM, llama.cpp, SGLang and TGI read it
        self._key = None
        if api_key_env:
            self._key = os.environ.get(api_key_env)
            if not self._key:
                raise UserError(f"teacher.http.api_key_env names {api_key_env}, which is not set in the environment")
        self._local = threading.local()
        self.retries = 0  # retried requests, for the manifest
        self.seconds = 0.0
        self.model = model or self._first_model()

    def describe(self) -> dict:
        """What a manifest records about this teacher (never the key: only whether one was sent)."""
        return {"kind": "http", "url": self.url, "model": self.model, "api": self.api,
                "api_key": "from the environment" if self._key else None}

    def _scrub(self, text: str) -> str:
        """``text`` with the API key blanked out (a server may echo what it was sent)."""
        return text.replace(self._key, "***") if self._key else text

    # ---- requests ----------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            if self._key:
                session.headers["Authorization"] = f"Bearer {self._key}"
        return session

    def _call(self, method: str, path: str, body: Optional[dict] = None) -> tuple[dict, int]:
        """The parsed JSON reply and the number of attempts; retries as the module docstring says."""
        last = "no reply"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
            wait_s = None
            try:
                r = self._session().request(method, self.url + path, json=body, timeout=self.timeout)
            except requests.exceptions.RequestException as e:  # refused, reset, timed out
                last = f"{type(e).__name__}: {_short(str(e))}"
            else:
                if r.status_code in RETRY_STATUS:
                    last = f"HTTP {r.status_code}: {_message(r)}"
                    wait_s = _retry_after(r)
                elif 400 <= r.status_code < 500:
                    message = _message(r)
                    if body is not None and any(w in message.lower() for w in CONTEXT_WORDS):
                        return {"__context_error__": self._scrub(f"HTTP {r.status_code}: {message}")}, attempt + 1
                    raise EndpointError(self._scrub(f"{self.url}{path} answered HTTP {r.status_code}: {message}"))
                elif r.status_code >= 300:
                    last = f"HTTP {r.status_code}: {_message(r)}"
                else:
                    try:
                        data = r.json()
                    except ValueError:
                        last = f"a reply that is not JSON ({_short(r.text)!r})"
                    else:
                        if isinstance(data, dict):
                            return data, attempt + 1
                        last = f"a JSON reply that is not an object ({_short(r.text)!r})"
            last = self._scrub(last)
            if attempt < self.max_retries:
                delay = wait_s if wait_s is not None else min(MAX_BACKOFF, self.backoff * 2 ** attempt)
                time.sleep(delay * (1.0 + 0.1 * random.random()))
        raise EndpointError(f"{self.url}{path}: no valid reply after {self.max_retries + 1} tries (last: {last}); is "
                            "the server running and serving this model?")

    def _first_model(self) -> str:
        data, _ = self._call("GET", "/models")
        models = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
        if not models or not isinstance(models[0], str):
            raise EndpointError(f"{self.url}/models lists no model; set teacher.http.model")
        return models[0]

    def _body(self, request: Request) -> dict:
        body = {"model": self.model, **self.settings, "seed": int(request.seed) & 0x7FFFFFFF, "n": 1}
        if self.api == "chat":
            body["messages"] = request.messages
            if self.logprobs:
                body.update(logprobs=True, top_logprobs=self.logprobs)
        else:
            body["prompt"] = request.prompt
            if self.logprobs:
                body["logprobs"] = self.logprobs
        return body

    def complete(self, request: Request) -> Reply:
        """One request (retried as needed); a reply that is not OpenAI-shaped is retried too."""
        body = self._body(request)
        problem = ""
        for _ in range(2):  # a malformed body after a 200: one more full round of tries, then an error
            data, attempts = self._call("POST", "/chat/completions" if self.api == "chat" else "/completions", body)
            if "__context_error__" in data:
                return Reply(error=data["__context_error__"], attempts=attempts)
            try:
                return self._parse(data, attempts)
            except (KeyError, IndexError, TypeError, ValueError) as e:
                problem = self._scrub(f"{type(e).__name__}: {_short(str(e))}; reply {_short(json.dumps(data))}")
        raise EndpointError(f"{self.url}: the server's replies are not OpenAI-compatible completions ({problem})")

    def _parse(self, data: dict, attempts: int) -> Reply:
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        if self.api == "chat":
            text = choice["message"]["content"] or ""
        else:
            text = choice["text"]
        if not isinstance(text, str):
            raise TypeError("the completion text is not a string")
        reply = Reply(text=text, finish_reason=choice.get("finish_reason"),
                      completion_tokens=usage.get("completion_tokens"), attempts=attempts)
        lp = choice.get("logprobs") if self.logprobs else None
        if lp:
            if self.api == "chat":
                content = lp["content"] or []
                reply.tokens = [str(t["token"]) for t in content]
                sampled = [float(t["logprob"]) for t in content]
                reply.top_logprobs = [{str(e["token"]): float(e["logprob"]) for e in t.get("top_logprobs") or []}
                                      for t in content]
            else:
                reply.tokens = [str(t) for t in lp["tokens"]]
                sampled = [float(v) for v in lp["token_logprobs"]]
                reply.top_logprobs = [{str(k): float(v) for k, v in (d or {}).items()} for d in lp["top_logprobs"]]
            if not len(reply.tokens) == len(reply.top_logprobs) == len(sampled):
                raise ValueError("tokens, token_logprobs and top_logprobs differ in length")
            reply.mean_logprob = sum(sampled) / len(sampled) if sampled else None
        return reply

    def generate(self, requests_: Sequence[Request], progress: Optional[Callable[[Reply], None]] = None) -> list[Reply]:
        """The replies to ``requests_``, in order; ``concurrency`` in flight. The first request that fails
        for good cancels the rest and raises its ``EndpointError``."""
        tic = time.perf_counter()
        out: list[Optional[Reply]] = [None] * len(requests_)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self.complete, r): i for i, r in enumerate(requests_)}
            try:
                for f in as_completed(futures):
                    out[futures[f]] = f.result()  # the first failure raises here
                    if progress is not None:
                        progress(out[futures[f]])
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            finally:
                self.seconds += time.perf_counter() - tic
        return out  # type: ignore[return-value]


def _retry_after(r: requests.Response) -> Optional[float]:
    value = r.headers.get("Retry-After")
    try:
        return min(MAX_BACKOFF * 4, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def _message(r: requests.Response) -> str:
    """The server's error message: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or the body."""
    try:
        data = r.json()
    except ValueError:
        return _short(r.text) or r.reason or ""
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return _short(err if isinstance(err, str) else json.dumps(err))
    return _short(json.dumps(data))


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."
