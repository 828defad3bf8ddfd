"""The JSON API under ``/api``: the twin of every page, the live prompt and steering streams
(Server-Sent Events), and the writes (labels, label status, presets) through the same library
calls as the command line.

Errors are ``{"detail": "<one line>"}``: 404 for an unknown SAE, version, label or preset,
422 for bad input (the catalog's or the library's message), 401 without the server's token,
403 on a read-only server, 413 for a body over the limit.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from saereg.analysis.web import views
from saereg.analysis.web.security import require_run, require_write
from saereg.analysis.web.streams import SteerStream, resolve_preset, sse
from saereg.analysis.web.warm import MAX_TOP, prompt_tokens

MAX_PROMPT_CHARS = 20_000
MAX_NEW_TOKENS = 256
MAX_STRENGTH = 1000.0
MAX_FEATURES = 32
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}

router = APIRouter(prefix="/api")

Index = Annotated[int, Field(ge=0, le=2**31 - 1, description="feature index")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptIn(Strict):
    text: str = Field(max_length=MAX_PROMPT_CHARS, description="the prompt")
    feature: Index | None = Field(None, description="a feature whose activation each token "
                                                    "gets (`act`)")
    top: int = Field(5, ge=0, le=MAX_TOP, description="strongest features listed per token")


class SteerFeature(Strict):
    index: Index
    strength: float = Field(allow_inf_nan=False, ge=-MAX_STRENGTH, le=MAX_STRENGTH)


class Generation(Strict):
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, allow_inf_nan=False, ge=0, le=10)
    top_k: int | None = Field(None, ge=0, le=10_000)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)

    def settings(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_k": self.top_k, "seed": self.seed}


class SteerIn(Generation):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    features: list[SteerFeature] = Field(default_factory=list, max_length=MAX_FEATURES)
    method: Literal["add", "clamp"] | None = None
    preset: str | None = Field(None, max_length=200, description="NAME or NAME@N")


class LabelIn(Strict):
    text: str = Field(max_length=2000)


class StatusIn(Strict):
    status: Literal["candidate", "accepted", "rejected"]


class PresetIn(Generation):
    name: str = Field(max_length=128)
    sae: str = Field(max_length=200, description="the SAE version the features belong to")
    features: list[SteerFeature] = Field(min_length=1, max_length=MAX_FEATURES)
    method: Literal["add", "clamp"] = "add"


def _db(request: Request) -> str | None:
    return request.app.state.database_url


@router.get("/saes", summary="SAE versions, filtered")
def api_saes(request: Request, model: str | None = None, hook: str | None = None,
             arch: str | None = None, tag: Annotated[list[str] | None, Query()] = None):
    return views.saes(model=model, hook=hook, arch=arch, tag=tag, database_url=_db(request))


@router.get("/sae/{ref}", summary="One version: config, metrics, lineage, aliases, "
                                  "publications, stats overview")
def api_version(request: Request, ref: str):
    return views.version(ref, _db(request))


@router.get("/sae/{ref}/diff/{other}", summary="Config and metric differences of two versions")
def api_diff(request: Request, ref: str, other: str):
    return views.diff(ref, other, _db(request))


@router.get("/sae/{ref}/feature/{index}", summary="A feature's dashboard")
def api_feature(request: Request, ref: str, index: int):
    return views.feature(ref, index, _db(request), request.app.state.models)


@router.get("/search", summary="Label search: full text (every word must match), by meaning, "
                              "or both fused",
            description="`mode=meaning` ranks by cosine of sentence embeddings (`rank` is the "
                        "cosine), `mode=hybrid` fuses the word and meaning ranks (`rank` is the "
                        "fused score). By meaning or hybrid with `model` and no `sae`, every SAE "
                        "of the model is searched and `groups` lists each version's best "
                        "`limit` hits; otherwise `groups` is null.")
def api_search(request: Request, q: str, model: str | None = None, hook: str | None = None,
               sae: str | None = None, min_rate: float | None = None,
               max_rate: float | None = None, limit: int = Query(50, ge=1, le=500),
               mode: Literal["words", "meaning", "hybrid"] = "words"):
    return views.search(q, model=model, hook=hook, sae=sae, min_rate=min_rate,
                        max_rate=max_rate, limit=limit, mode=mode, database_url=_db(request))


@router.get("/sae/{ref}/presets", summary="Steering presets bound to a version")
def api_presets(request: Request, ref: str):
    return views.steering(ref, _db(request))["presets"]


@router.get("/sae/{ref}/steering-runs", summary="Stored steering runs of a version's presets")
def api_runs(request: Request, ref: str):
    return views.steering_runs(views.get_version(ref, _db(request)), _db(request))


@router.post("/sae/{ref}/prompt", dependencies=[Depends(require_run)],
             response_class=StreamingResponse,
             summary="A prompt's tokens with their feature activations, as Server-Sent Events",
             description="One `data:` JSON object per token (`position`, `token`, `special`, "
                         "`act` when `feature` is given, `features` = [[index, value, label]] "
                         "when `top` > 0), then `event: done`.")
async def api_prompt(request: Request, ref: str, body: PromptIn):
    db_url = _db(request)
    info = await run_in_threadpool(views.get_version, ref, db_url)
    tokens = await run_in_threadpool(prompt_tokens, request.app.state.models, info, body.text,
                                     feature=body.feature, top=body.top)

    async def events():
        for item in tokens:
            if await request.is_disconnected():
                return
            yield sse(item)
        yield sse({"ref": info.ref, "tokens": len(tokens), "feature": body.feature},
                  event="done")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/sae/{ref}/steer", dependencies=[Depends(require_run)],
             response_class=StreamingResponse,
             summary="Default and steered continuations (same seed), as Server-Sent Events",
             description="`data:` {side: default|steered, text: piece} as they generate, then "
                         "`event: done` with {run_id, preset, seed, default, steered} "
                         "(run_id null on a read-only server). Either `features` (run as the "
                         "version's scratch preset) or `preset`.")
async def api_steer(request: Request, ref: str, body: SteerIn):
    db_url = _db(request)
    store = not request.app.state.policy.read_only
    info = await run_in_threadpool(views.get_version, ref, db_url)
    preset, save = await run_in_threadpool(
        lambda: resolve_preset(info, preset=body.preset,
                               features=[(f.index, f.strength) for f in body.features],
                               method=body.method, generation=body.settings(), store=store,
                               database_url=db_url))
    gen = {k: v for k, v in body.settings().items() if k != "seed"}
    stream = SteerStream(request.app.state.models, preset, body.prompt, seed=body.seed,
                         generation=gen, store=store, save=save, database_url=db_url)
    await stream.start()
    return StreamingResponse(stream.events(), media_type="text/event-stream",
                             headers=SSE_HEADERS)


@router.post("/sae/{ref}/feature/{index}/labels", dependencies=[Depends(require_write)],
             status_code=201, summary="Add a human label (appends; history is kept)")
def api_add_label(request: Request, ref: str, index: int, body: LabelIn):
    from saereg.analysis.labels import add_label

    info = views.get_version(ref, _db(request))
    return views._label(add_label(info.ref, index, body.text, database_url=_db(request)))


@router.post("/labels/{label_id}/status", dependencies=[Depends(require_write)],
             summary="Accept, reject (or reset to candidate) a label")
def api_label_status(request: Request, label_id: int, body: StatusIn):
    from saereg.analysis.labels import set_status

    return views._label(set_status(label_id, body.status, database_url=_db(request)))


@router.post("/presets", dependencies=[Depends(require_write)], status_code=201,
             summary="Create a steering preset, or its next version")
def api_create_preset(request: Request, body: PresetIn):
    from saereg.analysis.steering import create_preset

    info = views.get_version(body.sae, _db(request))
    p = create_preset(body.name, info.ref, [(None, f.index, f.strength) for f in body.features],
                      method=body.method, generation=body.settings(), database_url=_db(request))
    return {"name": p.name, "version": p.number, "ref": f"{p.name}@{p.number}", "sae": p.ref,
            "method": p.method, "features": p.features, "generation": p.generation}
