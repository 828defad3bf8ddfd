"""The HTML pages: each renders the same data as its JSON twin under ``/api`` (see
:mod:`.views`) with a Jinja2 template (autoescaped), and every page has a permalink.
Forms that only navigate (filters, search, diff, jump to a feature) are plain GET forms;
the live parts (prompt, steering, labelling) are the JavaScript files in ``static/``."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote as _quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from saereg.analysis.web import views
from saereg.registry.errors import UsageError

router = APIRouter(include_in_schema=False)


def quote(part: str) -> str:
    """One path segment of a redirect (``NAME@3`` stays as it is)."""
    return _quote(part, safe="@")


def render(request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
    app = request.app
    return app.state.templates.TemplateResponse(
        request, template, {"read_only": app.state.policy.read_only, **context},
        status_code=status)


def _db(request: Request) -> str | None:
    return request.app.state.database_url


@router.get("/")
def home():
    return RedirectResponse("/saes", status_code=307)


@router.get("/saes", response_class=HTMLResponse)
def saes_page(request: Request, model: str | None = None, hook: str | None = None,
              arch: str | None = None, tag: Annotated[list[str] | None, Query()] = None):
    data = views.saes(model=model, hook=hook, arch=arch, tag=[t for t in tag or [] if t],
                      database_url=_db(request))
    return render(request, "saes.html", data=data)


@router.get("/sae/{ref}", response_class=HTMLResponse)
def version_page(request: Request, ref: str):
    data = views.version(ref, _db(request))
    return render(request, "version.html", data=data, version_nav=data["ref"])


@router.get("/saelens/{release}/{sae_id:path}")
def release_page(request: Request, release: str, sae_id: str):
    """``saelens://RELEASE/ID`` as a path (a reference with slashes cannot sit in /sae/REF):
    the page of the version pulled from it (nothing is downloaded here)."""
    info = views.get_version(f"saelens://{release}/{sae_id}", _db(request))
    return RedirectResponse(f"/sae/{quote(info.ref)}", status_code=303)


@router.get("/sae/{ref}/diff")
def diff_form(request: Request, ref: str, other: str = ""):
    if not other.strip():
        raise UsageError("choose a version to compare with")
    views.get_version(other.strip(), _db(request))
    return RedirectResponse(f"/sae/{quote(ref)}/diff/{quote(other.strip())}", status_code=303)


@router.get("/sae/{ref}/diff/{other}", response_class=HTMLResponse)
def diff_page(request: Request, ref: str, other: str):
    data = views.diff(ref, other, _db(request))
    return render(request, "diff.html", data=data, version_nav=data["left"])


@router.get("/sae/{ref}/feature")
def jump(request: Request, ref: str, index: int):
    info = views.get_version(ref, _db(request))
    from saereg.analysis.stats import check_index

    check_index(info, index)
    return RedirectResponse(f"/sae/{quote(ref)}/feature/{index}", status_code=303)


@router.get("/sae/{ref}/feature/{index}", response_class=HTMLResponse)
def feature_page(request: Request, ref: str, index: int):
    data = views.feature(ref, index, _db(request), request.app.state.models)
    return render(request, "feature.html", data=data, version_nav=data["ref"])


@router.get("/search", response_class=HTMLResponse)
def search_page(request: Request, q: str = "", model: str = "", hook: str = "", sae: str = "",
                min_rate: str = "", max_rate: str = "", mode: str = "words"):
    min_rate, max_rate = _number(min_rate, "min_rate"), _number(max_rate, "max_rate")
    filters = {"model": model, "hook": hook, "sae": sae, "min_rate": min_rate,
               "max_rate": max_rate, "mode": mode}
    data = None
    if q.strip():
        data = views.search(q, model=model, hook=hook, sae=sae, min_rate=min_rate,
                            max_rate=max_rate, mode=mode, database_url=_db(request))
    return render(request, "search.html", q=q, filters=filters, data=data)


def _number(text: str, name: str) -> float | None:
    """A number typed into a form field (blank: none)."""
    if not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{name} must be a number, got {text!r}") from None


async def _choose(request: Request, page: str) -> HTMLResponse:
    data = await run_in_threadpool(views.saes, database_url=_db(request))
    return render(request, "choose.html", data=data, page=page)


@router.get("/prompt", response_class=HTMLResponse)
async def prompt_page(request: Request, sae: str = "", text: str = "", mode: str = "top",
                      feature: str = ""):
    if not sae:
        return await _choose(request, "prompt")
    info = await run_in_threadpool(views.get_version, sae, _db(request))
    return render(request, "prompt.html", info=info, version_nav=info.ref, text=text,
                  mode="feature" if mode == "feature" else "top",
                  feature=feature if feature.strip().isdigit() else "")


@router.get("/steer", response_class=HTMLResponse)
async def steer_page(request: Request, sae: str = "", preset: str = ""):
    if not sae:
        return await _choose(request, "steer")
    data = await run_in_threadpool(views.steering, sae, _db(request))
    return render(request, "steer.html", data=data, version_nav=data["ref"], chosen=preset)


@router.get("/docs", response_class=HTMLResponse)
def docs_page(request: Request):
    spec = request.app.openapi()
    ops = []
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            body = (op.get("requestBody") or {}).get("content", {}).get("application/json", {})
            ops.append({"method": method.upper(), "path": path,
                        "summary": op.get("summary", ""),
                        "description": op.get("description", ""),
                        "parameters": [{"name": p["name"], "in": p["in"],
                                        "required": p.get("required", False),
                                        "type": _schema_type(p.get("schema", {}))}
                                       for p in op.get("parameters", [])],
                        "body": _schema_name(body.get("schema", {})),
                        "responses": sorted(op.get("responses", {}))})
    schemas = spec.get("components", {}).get("schemas", {})
    return render(request, "docs.html", spec=spec, ops=ops, schemas=[
        {"name": name, "fields": [{"name": f, "type": _schema_type(s),
                                   "required": f in schema.get("required", []),
                                   "description": s.get("description", "")}
                                  for f, s in schema.get("properties", {}).items()]}
        for name, schema in sorted(schemas.items())])


def _schema_name(schema: dict) -> str:
    ref = schema.get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref else ""


def _schema_type(schema: dict) -> str:
    if "$ref" in schema:
        return _schema_name(schema)
    if "anyOf" in schema:
        return " | ".join(_schema_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list[{_schema_type(schema.get('items', {}))}]"
    if "enum" in schema:
        return " | ".join(map(str, schema["enum"]))
    return str(schema.get("type", "any"))
