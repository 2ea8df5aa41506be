"""HTTP for operators and monitoring: /healthz, Prometheus /metrics, JSON listings, job actions."""

from vesalius.node.api.app import create_app
from vesalius.node.api.auth import Tokens, load_tokens
from vesalius.node.api.server import HttpServer

__all__ = ["HttpServer", "Tokens", "create_app", "load_tokens"]
