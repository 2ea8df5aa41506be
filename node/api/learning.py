"""GET /corrections (received corrections, flagged ones included) and GET /cases (the case library's
public metadata: pseudonyms, no UID or folder) (issue 16, docs/learning.md)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from vesalius.node import audit
from vesalius.node.store import Store


def correction_routes(store: Store) -> list[Route]:
    async def corrections(request: Request) -> JSONResponse:
        from vesalius.node.corrections import corrections as rows

        found = await run_in_threadpool(rows, store)
        return JSONResponse([{**r, "recognised_at": audit.utc_iso(r["recognised_at"])} for r in found])

    async def cases(request: Request) -> JSONResponse:
        from vesalius.node.cases import cases as rows

        found = await run_in_threadpool(rows, store)
        return JSONResponse([{k: v for k, v in r.items() if k != "folder"} for r in found])

    return [Route("/corrections", corrections), Route("/cases", cases)]
