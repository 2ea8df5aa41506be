"""The API's routers: public (/healthz, /metrics when public) and token-protected (listings, actions)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from vesalius.node import audit
from vesalius.node.store import LISTINGS, Store

TIME_COLUMNS = ("last_received", "completed_at", "created_at", "updated_at", "next_try_at")
JSON_COLUMNS = ("destinations", "stages", "evaluation")


def shaped(row: dict[str, Any]) -> dict[str, Any]:
    """A listing row as an API object: JSON text columns parsed, times as ISO 8601 UTC."""
    out = dict(row)
    for key in JSON_COLUMNS:
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    for key in TIME_COLUMNS:
        if key in out:
            out[key] = audit.utc_iso(out[key])
    return out


def listing(store: Store, what: str, limit: int = 500, study: str | None = None) -> list[dict[str, Any]]:
    return [shaped(r) for r in store.listing(what, limit, study=study)]


def public_routes(store: Store) -> list[Route]:
    def healthz(request: Request) -> JSONResponse:
        store.query("SELECT 1")
        return JSONResponse({"status": "ok"})

    return [Route("/healthz", healthz)]


def listing_routes(store: Store) -> list[Route]:
    """GET /series, /jobs, /deliveries: the newest 500 rows; ``?study=UID`` narrows to one study."""
    def endpoint(what: str) -> Callable[[Request], JSONResponse]:
        def rows(request: Request) -> JSONResponse:
            return JSONResponse(listing(store, what, study=request.query_params.get("study")))
        return rows

    return [Route(f"/{what}", endpoint(what)) for what in LISTINGS]


def action_routes(store: Store, trail: audit.Audit) -> list[Route]:
    """POST /jobs/{id}/retry and /jobs/{id}/resend; each audited with the token's name."""
    def act(request: Request, action: str) -> JSONResponse:
        job_id = request.path_params["job_id"]
        if store.job(job_id) is None:
            code, body = 404, {"error": f"no job {job_id}"}
        elif action == "retry":
            ok = store.retry_job(job_id)
            code, body = (200, {"job": job_id, "state": "queued"}) if ok else (
                409, {"error": f"job {job_id} is still queued or running"})
        else:
            count = store.resend_job(job_id)
            code, body = (200, {"job": job_id, "deliveries": count}) if count else (
                409, {"error": f"job {job_id} has no deliveries (not finished yet?)"})
        client = f"{request.client.host}:{request.client.port}" if request.client else None
        trail.record(audit.OPERATOR_ACTION, outcome=audit.SUCCESS if code == 200 else audit.MINOR_FAILURE,
                     action="E", user=request.user.display_name, address=client, via="http",
                     command=action, job=job_id, status=code)
        return JSONResponse(body, status_code=code)

    def retry(request: Request) -> JSONResponse:
        return act(request, "retry")

    def resend(request: Request) -> JSONResponse:
        return act(request, "resend")

    return [Route("/jobs/{job_id:int}/retry", retry, methods=["POST"]),
            Route("/jobs/{job_id:int}/resend", resend, methods=["POST"])]
