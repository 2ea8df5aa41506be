"""Pull jobs over HTTP: GET /pulls, GET /pulls/{id}, POST /pulls (start, or ``"dry_run": true`` to
list the matches), POST /pulls/{id}/pause|resume|cancel. Every action is audited with the token's
name, like retry and resend (node.api.routes)."""

from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from vesalius.inference.fields import FieldError
from vesalius.node.audit import Audit
from vesalius.node.config import Config
from vesalius.node.pull import jobs
from vesalius.node.pull.dimse import SourceError
from vesalius.node.pull.query import parse_query
from vesalius.node.pull.runner import matches
from vesalius.node.store import Store

MAX_BODY = 1 << 20  # a query is small


def _client(request: Request) -> str | None:
    return f"{request.client.host}:{request.client.port}" if request.client else None


def pull_routes(store: Store, config: Config, trail: Audit) -> list[Route]:
    sources = {s.name: s for s in config.sources}

    def listing(request: Request) -> JSONResponse:
        return JSONResponse(jobs.listing(store))

    def one(request: Request) -> JSONResponse:
        found = jobs.job(store, request.path_params["job_id"])
        if found is None:
            return JSONResponse({"error": f"no pull job {request.path_params['job_id']}"}, status_code=404)
        return JSONResponse(found)

    async def start(request: Request) -> JSONResponse:
        body = await request.body()
        code, answer, job_id = await run_in_threadpool(_start, body, request.user.display_name)
        if job_id is not None or code != 200:
            await run_in_threadpool(jobs.record_action, trail, request.user.display_name, "http", "pull",
                                    job_id or 0, code, _client(request))
        return JSONResponse(answer, status_code=code)

    def _start(body: bytes, user: str) -> tuple[int, dict[str, Any] | list[Any], int | None]:
        if len(body) > MAX_BODY:
            return 413, {"error": "the request body is larger than 1 MB"}, None
        try:
            document = json.loads(body or b"{}")
            if not isinstance(document, dict):
                raise ValueError("expected a JSON object")
            unknown = set(document) - {"source", "query", "dry_run"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)} (allowed: source, query, dry_run)")
            query = parse_query(document.get("query") or {})
        except (ValueError, FieldError) as err:
            return 400, {"error": f"query: {err}"}, None
        source = sources.get(str(document.get("source", "")))
        if source is None:
            return 404, {"error": f"no source {str(document.get('source'))[:64]!r} "
                                  f"(configured: {', '.join(sources) or 'none'})"}, None
        if document.get("dry_run") is True:
            try:
                return 200, {"matches": [m.shown() for m in matches(source, query, config.ae_title)]}, None
            except SourceError as err:
                return 502, {"error": str(err)}, None
        job_id = jobs.create_job(store, source.name, query, user)
        return 200, {"pull": job_id, "state": "queued"}, job_id

    def action(name: str) -> Any:
        def endpoint(request: Request) -> JSONResponse:
            job_id = request.path_params["job_id"]
            code, answer = jobs.act(store, job_id, name)
            jobs.record_action(trail, request.user.display_name, "http", f"pull {name}", job_id, code,
                               _client(request))
            return JSONResponse(answer, status_code=code)
        return endpoint

    return [Route("/pulls", listing, methods=["GET"]), Route("/pulls", start, methods=["POST"]),
            Route("/pulls/{job_id:int}", one, methods=["GET"]),
            *(Route(f"/pulls/{{job_id:int}}/{name}", action(name), methods=["POST"])
              for name in jobs.ACTIONS)]
