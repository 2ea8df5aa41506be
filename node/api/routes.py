"""The API's routers: public (/healthz, /metrics when public) and token-protected (listings, actions)."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from vesalius.node import audit
from vesalius.node.store import DELIVERY_STATES, JOB_STATES, LISTING_FILTERS, LISTINGS, Store

TIME_COLUMNS = ("last_received", "completed_at", "created_at", "updated_at", "next_try_at", "selected_at")
JSON_COLUMNS = ("destinations", "stages", "progress", "evaluation", "correction")
MAX_LIMIT = 1000
STATES = {"jobs": JOB_STATES, "deliveries": DELIVERY_STATES,
          "series": ("receiving", "complete", "stored")}
CURSOR = {"jobs": "id", "deliveries": "id", "series": "last_received", "studies": "selected_at"}


class BadQuery(ValueError):
    """A listing parameter the API cannot use; the message names it."""


def _epoch(name: str, text: str) -> float:
    """An ISO 8601 date or time (naive = UTC) as seconds since the epoch."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BadQuery(f"{name}: expected an ISO 8601 date or time, got {text[:40]!r}") from None
    return (when.replace(tzinfo=UTC) if when.tzinfo is None else when).timestamp()


def listing_filters(what: str, query: dict[str, str]) -> tuple[int, dict[str, str | float | None]]:
    """The limit and store filters of a listing request (?state= ae= since= until= before= limit=)."""
    unknown = sorted(set(query) - {"limit", "study", *LISTING_FILTERS[what]})
    if unknown:
        raise BadQuery(f"{unknown[0]}: not a filter of /{what} (known: limit, study, "
                       f"{', '.join(LISTING_FILTERS[what])})")
    try:
        limit = int(query.get("limit", "500"))
    except ValueError:
        raise BadQuery("limit: expected a whole number") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadQuery(f"limit: must be 1-{MAX_LIMIT}")
    filters: dict[str, str | float | None] = {}
    if "state" in query:
        if query["state"] not in STATES.get(what, ()):
            raise BadQuery(f"state: one of {', '.join(STATES.get(what, ()))}")
        filters["state"] = query["state"]
    if "ae" in query:
        if not 0 < len(query["ae"]) <= 16:
            raise BadQuery("ae: an AE title of 1-16 characters")
        filters["ae"] = query["ae"]
    for name in ("since", "until"):
        if name in query:
            filters[name] = _epoch(name, query[name])
    if "job" in query:
        if not query["job"].isdigit():
            raise BadQuery("job: a job id")
        filters["job"] = int(query["job"])
    if "before" in query:
        if CURSOR[what] == "id":
            if not query["before"].isdigit():
                raise BadQuery("before: the id of the last row of the previous page")
            filters["before"] = int(query["before"])
        else:
            filters["before"] = _epoch("before", query["before"])
    return limit, filters


def next_page(request: Request, what: str, rows: list[dict[str, Any]], limit: int) -> str | None:
    """The URL of the next (older) page, when this one is full."""
    if len(rows) < limit:
        return None
    cursor = rows[-1][CURSOR[what]]
    query = {k: v for k, v in request.query_params.items() if k != "before"}
    query["before"] = str(cursor)
    return f"/{what}?{urllib.parse.urlencode(query)}"


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


def listing(store: Store, what: str, limit: int = 500, study: str | None = None,
            **filters: str | float | None) -> list[dict[str, Any]]:
    return [shaped(r) for r in store.listing(what, limit, study=study, **filters)]


def public_routes(store: Store) -> list[Route]:
    def healthz(request: Request) -> JSONResponse:
        store.query("SELECT 1")
        return JSONResponse({"status": "ok"})

    return [Route("/healthz", healthz)]


def listing_routes(store: Store) -> list[Route]:
    """GET /series, /jobs, /deliveries, /studies: the newest rows first (500 unless ``?limit=``);
    ``?study=UID`` narrows to one study, ``state``, ``ae``, ``since``, ``until`` filter, and
    ``before`` (the ``Link: rel="next"`` header's) pages back by keyset, fast at any depth."""
    def endpoint(what: str) -> Callable[[Request], JSONResponse]:
        def rows(request: Request) -> JSONResponse:
            try:
                limit, filters = listing_filters(what, dict(request.query_params))
            except BadQuery as err:
                return JSONResponse({"error": str(err)}, status_code=400)
            raw = store.listing(what, limit, study=request.query_params.get("study"), **filters)
            following = next_page(request, what, raw, limit)
            headers = {"Link": f'<{following}>; rel="next"'} if following else {}
            return JSONResponse([shaped(r) for r in raw], headers=headers)
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


def process_routes(store: Store, trail: audit.Audit, models: tuple[str, ...]) -> list[Route]:
    """GET /series/models: the models a series can be processed with; POST /series/{uid}/process
    {"model": name}: process a stored series again, with its last
    job's model and destinations unless another of the node's ``models`` is named; audited.
    Only a configured model name is accepted: a client never names a path."""
    async def process(request: Request) -> JSONResponse:
        uid = request.path_params["uid"]
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("model", ""), str):
            return JSONResponse({"error": 'expected a JSON object such as {"model": "builtin_ct"}'},
                                status_code=400)
        code, answer = await run_in_threadpool(queue_again, store, uid, body.get("model") or None, models)
        client = f"{request.client.host}:{request.client.port}" if request.client else None
        outcome = audit.SUCCESS if code == 200 else audit.MINOR_FAILURE
        await run_in_threadpool(
            trail.record, audit.OPERATOR_ACTION, outcome=outcome, action="E", user=request.user.display_name,
            address=client, via="http", command="process", series=uid if code != 404 else None,
            job=answer.get("job"), model=answer.get("model"), status=code)
        return JSONResponse(answer, status_code=code)

    def allowed(request: Request) -> JSONResponse:
        return JSONResponse({"models": list(models)})

    return [Route("/series/models", allowed), Route("/series/{uid}/process", process, methods=["POST"])]


def queue_again(store: Store, uid: str, model: str | None,
                models: tuple[str, ...]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, answer) of queueing one more job for a stored series."""
    if not store.query("SELECT 1 FROM series WHERE series_instance_uid=?", (uid,)):
        return 404, {"error": "no such series"}
    if not store.series_paths(uid):
        return 409, {"error": "the series' instances are no longer stored (retention); send it again"}
    last = store.query("SELECT model, destinations FROM jobs WHERE series_instance_uid=? ORDER BY id DESC "
                       "LIMIT 1", (uid,))
    model = model or (last[0]["model"] if last else models[0] if models else None)
    if model not in models:
        return 400, {"error": f"model: one of {', '.join(models)}"}
    destinations = json.loads(last[0]["destinations"]) if last else []
    with store.transaction() as db:
        job = store.add_job(db, uid, "dashboard", model, destinations)
    return 200, {"job": job, "state": "queued", "model": model}
