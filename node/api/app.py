"""The HTTP application: an app factory over the store, so a dashboard can mount its own router."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router

from vesalius.node.api.auth import TokenGuard, Tokens
from vesalius.node.api.dashboard import dashboard_routes
from vesalius.node.api.evaluate import evaluate_routes
from vesalius.node.api.learning import correction_routes
from vesalius.node.api.metrics import metrics_endpoint
from vesalius.node.api.results import result_routes
from vesalius.node.api.routes import action_routes, listing_routes, process_routes, public_routes
from vesalius.node.audit import Audit
from vesalius.node.database import OperationalError
from vesalius.node.store import Store


def create_app(store: Store, tokens: Tokens, trail: Audit, *, metrics_public: bool = True,
               models: tuple[str, ...] = (), ohif_url: str = "",
               extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """Public routes first; everything else (including unknown paths and ``extra_routes``, the
    routes of other modules such as node.api.pull) behind the token guard.
    ``models``: what the dashboard may process a series with; ``ohif_url``: its OHIF links."""
    metrics = Route("/metrics", metrics_endpoint(store))
    protected: list[BaseRoute] = [*listing_routes(store), *action_routes(store, trail), *extra_routes]
    protected += [*result_routes(store, ohif_url), *process_routes(store, trail, models)]
    protected += evaluate_routes(store, trail)  # POST /jobs/{id}/evaluate (issue 15)
    protected += correction_routes(store)  # GET /corrections, /cases (issue 16)
    public: list[BaseRoute] = [*public_routes(store), *dashboard_routes()]
    (public if metrics_public else protected).append(metrics)
    guard = Middleware(TokenGuard, tokens=tokens, trail=trail)
    guarded = Mount("", app=Router(protected), middleware=[guard])
    return Starlette(routes=[*public, guarded], exception_handlers={HTTPException: json_error,
                                                                    OperationalError: database_down})


async def database_down(request: Request, exc: Exception) -> Response:
    """The database is unreachable (restarting): 503, so a client or load balancer retries."""
    return JSONResponse({"error": "database unavailable"}, status_code=503, headers={"Retry-After": "2"})


async def json_error(request: Request, exc: Exception) -> Response:
    """404, 405 and the like as JSON, like every other answer of the API."""
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
