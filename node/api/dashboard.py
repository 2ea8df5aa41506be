"""The dashboard: a static page (node/api/web) the node serves at /, three.js beside it.

The page and its assets are public (they hold no data); every number on it comes from the
token-guarded API, which the page calls with the token the user typed (kept in sessionStorage).
A Content-Security-Policy keeps the page to this origin: no CDN, no request leaves the node.
three.js is installed from npm by scripts/setup.sh into web/node_modules (pinned in
web/package.json and web/package-lock.json).
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

WEB = Path(__file__).parent / "web"
THREE = WEB / "node_modules" / "three"
IMPORT_MAP = re.compile(r'<script type="importmap">(.*?)</script>', re.S)


def _policy(page: str) -> str:
    """This origin only; the page's inline import map allowed by its hash."""
    found = IMPORT_MAP.search(page)
    digest = base64.b64encode(hashlib.sha256(found[1].encode()).digest()).decode() if found else ""
    return ("default-src 'self'; script-src 'self'" + (f" 'sha256-{digest}'" if digest else "") +
            "; img-src 'self' blob: data:; connect-src 'self' blob: data:; style-src 'self'; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class Assets(StaticFiles):
    """Static files with the page's security headers and no caching (a new version shows at once)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [(b"x-content-type-options", b"nosniff"),
                                       (b"cache-control", b"no-cache")]
            await send(message)

        await super().__call__(scope, receive, with_headers)


def dashboard_routes() -> list[BaseRoute]:
    """GET / (the page), /static/... (its scripts and styles), /static/three/... (three.js)."""
    page = (WEB / "index.html").read_text()
    headers = {"Content-Security-Policy": _policy(page), "X-Content-Type-Options": "nosniff",
               "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}

    def index(request: Request) -> Response:
        return HTMLResponse(page, headers=headers)

    routes: list[BaseRoute] = [Route("/", index)]
    if THREE.is_dir():  # absent until scripts/setup.sh ran npm ci: the page says the 3D view is missing
        routes.append(Mount("/static/three", app=Assets(directory=THREE), name="three"))
    routes.append(Mount("/static", app=Assets(directory=WEB, check_dir=True), name="static"))
    return routes
