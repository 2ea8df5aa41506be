"""Bearer tokens for the HTTP API: named, compared in constant time, never logged.

The node always has one token of its own, ``local``, in ``<data_dir>/http.token`` (mode 0600,
created at first start): whoever can read the data folder can use the API. More tokens, each with
a name that logs and the audit trail show, come from ``[[http_tokens]]`` in the configuration.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from starlette.authentication import AuthCredentials, SimpleUser
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from vesalius.node import audit
from vesalius.node.checks import ConfigError
from vesalius.node.config import HttpToken

log = logging.getLogger("vesalius.api")

TOKEN_FILE = "http.token"
LOCAL_TOKEN = "local"


@dataclass(frozen=True)
class Tokens:
    """Token name -> secret; ``match`` says whose token a request presents."""

    secrets: tuple[tuple[str, bytes], ...]

    def match(self, authorization: str | None) -> str | None:
        """The token's name for an ``Authorization: Bearer ...`` header, or None."""
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        given = presented.strip().encode()
        found = None
        for name, secret in self.secrets:  # every token compared, in constant time each
            if hmac.compare_digest(given, secret):
                found = name
        return found


def _read_secret(path: Path, where: str) -> bytes:
    try:
        mode = path.stat().st_mode
        secret = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"{where}: cannot read {path}: {err.strerror}") from None
    if mode & (stat.S_IRWXO):
        raise ConfigError(f"{where}: {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
                          "chmod o-rwx it")
    if len(secret) < 16 or " " in secret:
        raise ConfigError(f"{where}: {path} must hold one token of at least 16 characters")
    return secret.encode()


def local_token(data_dir: Path) -> Path:
    """The node's own token file, created (0600) when absent; its path is logged, never its content."""
    path = data_dir / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise ConfigError(f"{path}: the HTTP token file must be readable by its owner only "
                              "(chmod 600)") from None
        return path
    try:
        os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created the HTTP API token %s (mode 0600, token name %r)", path, LOCAL_TOKEN)
    return path


def load_tokens(data_dir: Path, configured: tuple[HttpToken, ...]) -> Tokens:
    """The local token plus the configured ones; a ConfigError names what is wrong."""
    found = [(LOCAL_TOKEN, _read_secret(local_token(data_dir), TOKEN_FILE))]
    for i, token in enumerate(configured):
        if token.token_file is not None:
            found.append((token.name, _read_secret(token.token_file, f"http_tokens[{i}].token_file")))
        else:
            found.append((token.name, token.token.encode()))
    return Tokens(tuple(found))


def _printable(text: str, limit: int = 200) -> str:
    """A request path fit for a log line: no control characters, bounded length."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class TokenGuard:
    """ASGI middleware: a request passes only with a known bearer token (its name becomes
    ``request.user``); otherwise 401 with ``WWW-Authenticate: Bearer``, a log line with the
    client's address and a User Authentication audit event, never the token presented."""

    def __init__(self, app: ASGIApp, tokens: Tokens, trail: audit.Audit) -> None:
        self.app = app
        self.tokens = tokens
        self.trail = trail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        name = self.tokens.match(request.headers.get("authorization"))
        if name is None:
            client = f"{request.client.host}:{request.client.port}" if request.client else "unknown"
            presented = "wrong" if "authorization" in request.headers else "missing"
            log.warning("http %s %s from %s refused: %s bearer token", request.method,
                        _printable(request.url.path), client, presented)
            await run_in_threadpool(self.trail.record, audit.USER_AUTHENTICATION,
                                    outcome=audit.MINOR_FAILURE, event_type="Login", action="E",
                                    address=client, reason=f"{presented} bearer token",
                                    method=request.method, path=_printable(request.url.path))
            response = JSONResponse({"error": "a bearer token is required (Authorization: Bearer ...)"},
                                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="vesalius"'})
            await response(scope, receive, send)
            return
        scope["user"] = SimpleUser(name)
        scope["auth"] = AuthCredentials(["authenticated"])
        await self.app(scope, receive, send)
