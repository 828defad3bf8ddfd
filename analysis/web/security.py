"""Who may do what on a ``saereg serve`` server, and the limits every request meets.

- Binding: the loopback interface by default. Bound anywhere else the server refuses to start
  without a token (:func:`check_binding`), and then every write and every request that runs a
  model needs ``Authorization: Bearer <token>`` (:func:`require_run`, :func:`require_write`).
  Reading pages and JSON needs nothing.
- ``read_only``: every write is answered 403; steering still runs but nothing is stored.
- :class:`Guard`, an ASGI middleware in front of everything: on a loopback server a request
  must be addressed to a loopback name (``Host``), so that a web page elsewhere cannot reach
  the server through DNS rebinding; a write must come from the server's own pages (``Origin``,
  when the browser sends one, names this server); a request body is at most
  :data:`MAX_BODY` bytes; every response carries a content security policy that allows
  scripts, styles and images from this server only, and no referrer.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

from saereg.registry.errors import UsageError

MAX_BODY = 64 * 1024
"""Bytes a request body may hold (prompts, labels and presets are far smaller)."""
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
     b"img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
     b"frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, IPv6 with or without brackets) is this machine's
    loopback interface only."""
    name = (host or "").strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuse to serve beyond the loopback interface without a token."""
    if token is not None and (not token.strip() or any(c.isspace() for c in token)):
        raise UsageError("--token must be a non-empty string without spaces")
    if not is_loopback(host) and not token:
        raise UsageError(f"binding to {host!r} makes the server reachable from other machines; "
                         "give it a --token (or SAEREG_TOKEN): every write and model run will "
                         "then need it")


@dataclass(frozen=True)
class Policy:
    """What the server was started with."""

    host: str = "127.0.0.1"
    token: str | None = None
    read_only: bool = False

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def authorize(self, authorization: str | None) -> None:
        if not self.token:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self.token.encode()):
            raise HTTPException(401, "this server needs its token for writes and model runs: "
                                     "send it as a bearer token in the Authorization header "
                                     "(open the URL that `saereg serve` printed once, and the "
                                     "pages send it)")


def require_run(request: Request) -> None:
    """A dependency of every route that runs a model."""
    request.app.state.policy.authorize(request.headers.get("authorization"))


def require_write(request: Request) -> None:
    """A dependency of every route that writes to the catalog."""
    policy: Policy = request.app.state.policy
    policy.authorize(request.headers.get("authorization"))
    if policy.read_only:
        raise HTTPException(403, "this server is read-only (started with --read-only): "
                                 "labels, presets and steering runs are not written")


def _host_name(host_header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8000`` -> ``::1``)."""
    try:
        return urlsplit(f"//{host_header}").hostname or ""
    except ValueError:
        return ""


class Guard:
    """ASGI middleware: host and origin checks, the body limit, security headers, and a
    ``Server-Timing: app;dur=MS`` header: the milliseconds from the request's arrival to its
    response head (for a page or a JSON answer, the whole server time; for a stream, the time
    to its first byte)."""

    def __init__(self, app, policy: Policy, max_body: int = MAX_BODY):
        self.app, self.policy, self.max_body = app, policy, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.policy.loopback and not is_loopback(_host_name(host)):
            return await _refuse(send, 421, f"this server answers requests addressed to "
                                            f"127.0.0.1 or localhost only, not {host!r}")
        method = scope.get("method", "GET")
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin and origin != "null":
            if urlsplit(origin).netloc.lower() != host.lower():
                return await _refuse(send, 403, f"refused a {method} from another site "
                                                f"({origin}); use this server's own pages")
        if method not in SAFE_METHODS:
            try:
                declared = int(headers.get("content-length") or 0)
            except ValueError:
                return await _refuse(send, 400, "Content-Length is not a number")
            if declared > self.max_body:
                return await _refuse(send, 413, self._too_large())
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away before sending its body
                body += message.get("body", b"")
                if len(body) > self.max_body:
                    return await _refuse(send, 413, self._too_large())
                if not message.get("more_body"):
                    break
            receive = _replay(bytes(body), receive)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                took = f"app;dur={(time.perf_counter() - start) * 1e3:.1f}".encode()
                message = {**message, "headers": [*message.get("headers", []), *HEADERS,
                                                  (b"server-timing", took)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_body // 1024} KiB"


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later messages (http.disconnect) come from the client

    return replayed


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *HEADERS]})
    await send({"type": "http.response.body", "body": body})
