"""The ASGI app of ``saereg serve``: :func:`create_app`.

One app serves the HTML pages, their JSON twins under ``/api``, the OpenAPI document at
``/openapi.json`` and a page of our own that renders it at ``/docs`` (FastAPI's default docs
page loads its scripts from a CDN), and the CSS and JavaScript shipped in ``static/``. Every
known failure becomes one line: ``{"detail": ...}`` for the API, an error page for the pages,
with 404 for an unknown thing and 422 for bad input, never a traceback.
"""

from __future__ import annotations

import importlib.metadata
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from starlette.exceptions import HTTPException

from saereg.analysis.web import api, pages
from saereg.analysis.web.errors import describe
from saereg.analysis.web.security import Guard, Policy, check_binding
from saereg.analysis.web.warm import WarmModels
from saereg.registry.errors import SaeRegError, redact

HERE = Path(__file__).resolve().parent
TEMPLATES, STATIC = HERE / "templates", HERE / "static"


def _version() -> str:
    try:
        return importlib.metadata.version("sae-registry")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "0"


def num(value: Any, digits: int = 3) -> str:
    """A number for a table cell: ``-`` for none, thousands separators for integers, fixed
    or scientific notation for floats."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def shade(act: float | None, scale: float | None) -> str:
    """The inline background of a token that activates by ``act`` (0 .. ``scale``)."""
    if not act or act <= 0 or not scale or scale <= 0:
        return ""
    alpha = 0.12 + 0.78 * min(1.0, act / scale)
    return f"background-color: rgba(255, 110, 0, {alpha:.3f})"


def when(text: str | None) -> str:
    if not text:
        return "-"
    try:
        return datetime.fromisoformat(text).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return text


def templates() -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=num, shade=shade, when=when)
    version = _version()
    env.globals["static"] = lambda name: f"/static/{name}?v={version}"
    env.globals["version"] = version
    return Jinja2Templates(env=env)


def _wants_json(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/api/") or path == "/openapi.json" or (
        "application/json" in request.headers.get("accept", "")
        and "text/html" not in request.headers.get("accept", ""))


def _answer(request: Request, status: int, detail: str):
    if _wants_json(request):
        return JSONResponse({"detail": detail}, status_code=status)
    return pages.render(request, "error.html", status=status, status_code=status,
                        detail=detail)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        where = ".".join(loc) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return redact("; ".join(parts) or "invalid request")


def create_app(database_url: str | None = None, *, host: str = "127.0.0.1",
               token: str | None = None, read_only: bool = False, max_models: int = 2,
               max_saes: int = 8) -> FastAPI:
    """The app over the catalog at ``database_url`` (default: ``SAEREG_DATABASE_URL`` or the
    SQLite catalog in ``SAEREG_HOME``), as it is served on ``host``: beyond the loopback
    interface it needs ``token`` (a ``UsageError`` otherwise), and then every write and model
    run must send it; ``read_only`` refuses every write. ``max_models`` language models and
    ``max_saes`` SAEs stay loaded between requests."""
    check_binding(host, token)
    policy = Policy(host=host, token=token, read_only=read_only)
    app = FastAPI(title="saereg serve", version=_version(), docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json",
                  description="The catalog of SAE versions, their features, labels and "
                              "steering presets. Writes and model runs need `Authorization: "
                              "Bearer <token>` when the server has a token.")
    app.state.database_url = database_url
    app.state.policy = policy
    app.state.models = WarmModels(database_url, max_models=max_models, max_saes=max_saes)
    app.state.templates = templates()
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)

    @app.exception_handler(SaeRegError)
    async def on_library_error(request: Request, exc: SaeRegError):
        return _answer(request, *describe(exc))

    @app.exception_handler(RequestValidationError)
    async def on_bad_request(request: Request, exc: RequestValidationError):
        return _answer(request, 422, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no page at {request.url.path}"
        response = _answer(request, exc.status_code, redact(detail))
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        return _answer(request, *describe(exc))

    app.add_middleware(Guard, policy=policy)
    return app

