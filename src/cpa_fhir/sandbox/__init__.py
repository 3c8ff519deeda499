"""The sandbox FHIR server: a framework-free router over the store, auth and consent
filtering, in a thin FastAPI shell."""

from cpa_fhir.sandbox._app import create_app
from cpa_fhir.sandbox._auth import Client, Registry, parse_registry, parse_scope
from cpa_fhir.sandbox._router import Request, Response, Router
from cpa_fhir.sandbox._server import DEFAULT_DB, Sandbox, load_registry, open_sandbox, seed_examples

__all__ = [
    "DEFAULT_DB",
    "Client",
    "Registry",
    "Request",
    "Response",
    "Router",
    "Sandbox",
    "create_app",
    "load_registry",
    "open_sandbox",
    "parse_registry",
    "parse_scope",
    "seed_examples",
]
