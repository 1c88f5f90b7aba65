"""`genre llm-serve`: a small OpenAI-compatible chat-completions server around the local model,
so several Airflow workers share one loaded model (point them at it with ``augment.backend:
http`` and ``GENRE_LLM_BASE_URL=http://127.0.0.1:<port>/v1``).

Endpoints: ``POST /v1/chat/completions`` (non-streaming; a trailing assistant message is a
prefill the model continues, as Ollama/vLLM do), ``GET /v1/models``, ``GET /health``.
Requests arriving within ``batch_wait`` seconds are generated together (one batched greedy
``generate``, up to ``batch_size`` prompts). Binds 127.0.0.1 by default; with ``--api-key-env``
set, a request must carry ``Authorization: Bearer <that key>``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger("genre.llm_serve")
MAX_BODY = 1 << 20
MAX_TOKENS_CAP = 512


class Batcher:
    """Collects requests for ``wait`` seconds (at most ``size``) and generates them together."""

    def __init__(self, backend, size: int = 8, wait: float = 0.05) -> None:
        self.backend, self.size, self.wait = backend, size, wait
        self.q: queue.Queue = queue.Queue()
        self.batches = 0
        self.max_batch = 0
        threading.Thread(target=self._loop, daemon=True, name="llm-batcher").start()

    def submit(self, chat, max_tokens: int, stop: str | None = None) -> Future:
        fut: Future = Future()
        self.q.put((chat, max_tokens, stop, fut))
        return fut

    def _loop(self) -> None:
        while True:
            first = self.q.get()
            batch = [first]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self.q.get(timeout=left))
                except queue.Empty:
                    break
            self.batches += 1
            self.max_batch = max(self.max_batch, len(batch))
            groups: dict = {}
            for b in batch:  # one generate per stop string (a batch shares its stopping rule)
                groups.setdefault(b[2], []).append(b)
            for stop, group in groups.items():
                try:
                    replies = self.backend.generate([b[0] for b in group], max(b[1] for b in group), stop)
                    for (_, _, _, fut), reply in zip(group, replies):
                        fut.set_result(reply)
                except Exception as exc:  # the request threads answer 500 with the message
                    for *_, fut in group:
                        fut.set_exception(exc)


def make_handler(batcher: Batcher, model_name: str, api_key: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # through logging, not stderr lines
            logger.info("%s %s", self.address_string(), fmt % args)

        def _send(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, code: int, message: str) -> None:
            self._send(code, {"error": {"message": message, "type": "invalid_request_error"
                                        if code < 500 else "server_error"}})

        def _authorised(self) -> bool:
            if not api_key:
                return True
            if self.headers.get("Authorization", "") == f"Bearer {api_key}":
                return True
            self._error(401, "missing or wrong API key")
            return False

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                return self._send(200, {"status": "ok", "model": model_name})
            if not self._authorised():
                return None
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model",
                                                                     "owned_by": "genre"}]})
            return self._error(404, f"no route {self.path}")

        def do_POST(self):  # noqa: N802
            if not self._authorised():
                return None
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                return self._error(400, f"body must be 1..{MAX_BODY} bytes")
            try:
                req = json.loads(self.rfile.read(length))
                messages = req["messages"]
                if not isinstance(messages, list) or not messages or not all(
                        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                        and isinstance(m.get("content"), str) for m in messages):
                    raise ValueError("messages must be a non-empty list of {role, content}")
                max_tokens = int(req.get("max_tokens") or 128)
                if not 1 <= max_tokens <= MAX_TOKENS_CAP:
                    raise ValueError(f"max_tokens must be 1..{MAX_TOKENS_CAP}")
                if float(req.get("temperature", 0) or 0) != 0:
                    raise ValueError("only greedy decoding (temperature 0) is served")
                stop = req.get("stop")
                stop = [stop] if isinstance(stop, str) else (stop or [])
                if len(stop) > 1 or not all(isinstance(x, str) and x for x in stop):
                    raise ValueError("stop: at most one non-empty string is supported")
            except (ValueError, KeyError, TypeError) as exc:
                return self._error(400, f"bad request: {exc}")
            prefill = ""
            if messages[-1]["role"] == "assistant":
                prefill = messages[-1]["content"]
                messages = messages[:-1]
            try:
                reply = batcher.submit((messages, prefill), max_tokens, stop[0] if stop else None).result(timeout=600)
            except Exception as exc:
                logger.exception("generation failed")
                return self._error(500, f"generation failed: {type(exc).__name__}: {exc}")
            return self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "finish_reason": "length" if reply.tokens >= max_tokens else "stop",
                             "message": {"role": "assistant", "content": reply.text}}],
                "usage": {"completion_tokens": reply.tokens}})

    return Handler


def serve(backend, host: str = "127.0.0.1", port: int = 8765, model_name: str | None = None,
          api_key: str | None = None, batch_size: int = 8, batch_wait: float = 0.05) -> ThreadingHTTPServer:
    """A started server (``server.serve_forever()`` runs it; ``server.server_address`` gives the
    port when 0 was asked)."""
    batcher = Batcher(backend, batch_size, batch_wait)
    server = ThreadingHTTPServer((host, port), make_handler(batcher, model_name or backend.model_id, api_key))
    server.daemon_threads = True
    server.batcher = batcher  # type: ignore[attr-defined]
    return server


def cli(argv: list[str] | None = None) -> int:
    from genre_tasks.features.augment.backends import LocalBackend
    from genre_tasks.features.augment.params import QUANTIZE
    from genre_tasks.logs import setup_logging

    parser = argparse.ArgumentParser(prog="genre llm-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help=argparse.SUPPRESS)
    parser.add_argument("--params", default="params.yaml", help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--model-path", default=None, help=".gguf file (default: the packaged SmolLM2)")
    parser.add_argument("--model-name", default=None, help="name served in 'model' (default: the model id)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quantize", choices=QUANTIZE, default="none",
                        help="w8a8: int8 weights x int8 activations per token (its own model id in the generation cache)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-wait", type=float, default=0.05, help="seconds to gather a batch")
    parser.add_argument("--api-key-env", default=None,
                        help="environment variable holding the key clients must send (default: none)")
    args = parser.parse_args(argv)
    setup_logging()
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        parser.error(f"${args.api_key_env} is empty")
    backend = LocalBackend(args.model_path, args.threads, args.quantize)
    t0 = time.perf_counter()
    backend.load()
    server = serve(backend, args.host, args.port, args.model_name, key, args.batch_size, args.batch_wait)
    host, port = server.server_address[:2]
    print(f"genre llm-serve: {args.model_name or backend.model_id} loaded in {time.perf_counter() - t0:.1f} s; "
          f"http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
