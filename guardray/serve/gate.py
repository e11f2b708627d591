"""What every HTTP request passes before FastAPI parses it: the bearer token, the body size, UTF-8, and the
replica's bounded queue.

A pure ASGI middleware (`Gate`), so a refused request costs no parsing and no tokenising, and every refusal has
the project's one-line JSON error shape (`error_body`, the same as the app's 400s):
- 401 without `Authorization: Bearer <key>` when the server has a key (`--api-key-env NAME`: the key is read
  from that environment variable in the replica; it is never logged, echoed or stored, and compared in constant
  time). Every path needs it, `/health` included (it shows the threshold); Serve's own `/-/healthz` does not.
- 413 for a body over `max_body_bytes`: from `Content-Length` before anything is read, else as soon as the
  streamed body passes it; 400 for a body that is not UTF-8.
- 503 with `Retry-After` once the replica holds `max_ongoing_requests + max_queued_requests` requests on the
  model's endpoints (answered or waiting for the model): the server's bounded queue is its own, not Serve's,
  whose rejection is plain text (`app.build_app` gives Serve room beyond it, so Serve's queue stays empty).

The state (the key, the count of held requests) lives on the replica's `GuardrayServer` (`Gatekeeper`); the
middleware finds it through Serve's replica context, as Serve's class-based FastAPI views do. Outside a Serve
replica it fails closed (500).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any, Awaitable, Callable

from guardray.errors import InputError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: the endpoints that run the model: the ones the bounded queue counts
MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/score"})


def error_body(message: str, kind: str) -> dict[str, Any]:
    """The one error shape of every refusal (OpenAI's): `{"error": {"message": ..., "type": ...}}`."""
    return {"error": {"message": message, "type": kind}}


def read_api_key(name: str) -> bytes:
    """The key in environment variable `name`; a one-line InputError (naming the variable, never a value) when it
    is missing, empty or not one header token."""
    value = os.environ.get(name)
    if not value:
        raise InputError(f"api_key_env: the environment variable {name} is not set (or empty) where the server runs")
    if value != value.strip() or any(c.isspace() for c in value) or not value.isascii():
        raise InputError(f"api_key_env: the value of {name} must be one printable ASCII word (no spaces)")
    return value.encode()


class Gatekeeper:
    """One replica's gate: its key (or none), body limit and bounded queue, with counters for /health."""

    def __init__(self, api_key: bytes | None, max_body_bytes: int, capacity: int, retry_after_s: int):
        self._key_digest = None if api_key is None else hashlib.sha256(api_key).digest()
        self.max_body_bytes, self.capacity, self.retry_after_s = max_body_bytes, capacity, retry_after_s
        self.held = 0  # requests on the model's endpoints now in this replica
        self.refused_busy = 0  # 503s: the queue was full

    @classmethod
    def from_settings(cls, settings: Any) -> "Gatekeeper":
        key = read_api_key(settings.api_key_env) if settings.api_key_env else None
        return cls(key, settings.max_body_bytes, settings.max_ongoing_requests + settings.max_queued_requests,
                   settings.retry_after_s)

    @property
    def requires_key(self) -> bool:
        return self._key_digest is not None

    def authorized(self, scope: Scope) -> bool:
        """`Authorization: Bearer <key>`, compared as digests in constant time (no length or prefix leaks)."""
        if self._key_digest is None:
            return True
        presented = b""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                presented = value
        scheme, _, token = presented.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token.strip()).digest(),
                                                                   self._key_digest)

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.authorized(scope):
            await refuse(send, 401, "Authorization: this server needs a bearer token (Authorization: Bearer <key>)",
                         "authentication_error", [(b"www-authenticate", b"Bearer")])
            return
        counted = _route(scope) in MODEL_PATHS
        if counted and self.held >= self.capacity:
            self.refused_busy += 1
            await refuse(send, 503, f"server busy: this replica holds {self.capacity} requests; retry after "
                         f"{self.retry_after_s} s", "server_overloaded",
                         [(b"retry-after", str(self.retry_after_s).encode())])
            return
        self.held += counted
        try:
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body = await self._body(scope, receive, send)
                if body is None:
                    return
                receive = _replay(body, receive)
            await app(scope, receive, send)
        finally:
            self.held -= counted

    async def _body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, read up to the limit; None once a refusal was sent."""
        declared = next((v for n, v in scope.get("headers", ()) if n.lower() == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._too_large(send, declared)
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(send, None)
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            await refuse(send, 400, f"body: not UTF-8 (invalid byte at offset {e.start})", "invalid_request_error")
            return None
        return body

    async def _too_large(self, send: Send, declared: bytes | None) -> None:
        if declared is not None and not declared.isdigit():
            await refuse(send, 400, "Content-Length: not a byte count", "invalid_request_error")
            return
        size = f" ({int(declared)} bytes)" if declared is not None else ""
        await refuse(send, 413, f"body: over this server's limit of {self.max_body_bytes} bytes{size}",
                     "invalid_request_error")


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then the connection's own messages (a disconnect ends a stream)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def refuse(send: Send, status: int, message: str, kind: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(message, kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _route(scope: Scope) -> str:
    """The request's path below the app's mount point: a Serve `route_prefix` other than '/' arrives in the
    path and `root_path`, and must not let model calls past the bounded queue."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class Gate:
    """The ASGI middleware around the FastAPI app: each request goes through its replica's `Gatekeeper`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # a websocket would pass no token check: this API has none
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        from ray import serve

        gatekeeper: Gatekeeper = serve.get_replica_context().servable_object.gatekeeper
        await gatekeeper(self.app, scope, receive, send)


def prompt_char_limit(tokenizer: Any, max_length: int) -> int:
    """Characters a text may have and still fit `max_length` tokens: no token stands for more characters than
    its vocabulary string has (a byte-level token's string has one character per byte), so a text longer than
    `max_length` times the longest one cannot fit. Checked before tokenising: a huge prompt costs a `len`."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return max_length * max(longest, 1)
