"""Steering runs streamed to the client while they generate.

The run itself is :func:`saereg.analysis.steering.steer` (the default continuation, then the
steered one, with the same seed; stored with its preset version), called in a worker thread
on the server's warm model with a streamer for each side. The streamer hands every new piece
of text to the request's event loop, and raises :class:`Cancelled` at the next token once the
client has gone, which ends the generation without storing anything.

Features picked by hand (no preset) are run as the preset ``scratch.NAME.N`` of the SAE
version ``NAME@N``: its latest version when it holds the same features, method and
generation settings, else a new version of it, saved once the run has passed every check
(so a refused request writes nothing). Every stored run thus names the exact features it
used. A read-only server runs them as a preset that is never saved, and stores no run.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

from saereg.registry.errors import NotFoundError, UsageError

SCRATCH = "scratch.{name}.{number}"


class Cancelled(Exception):
    """The client went away."""


def sse(data: Any, event: str | None = None) -> str:
    """One Server-Sent Event: ``data`` as one line of JSON."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


class PieceStreamer:
    """A transformers streamer for one generation: decodes the tokens generated so far and
    emits the text added since the last piece (holding back a piece that ends inside a
    multi-byte character)."""

    def __init__(self, tokenizer, emit, cancelled: threading.Event):
        self.tokenizer, self.emit, self.cancelled = tokenizer, emit, cancelled
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.cancelled.is_set():
            raise Cancelled
        if not self.prompt_seen:  # the first call hands over the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.emit(text[len(self.sent):])
        self.sent = text


def resolve_preset(info, *, preset: str | None, features: list[tuple[int, float]],
                   method: str | None, generation: dict[str, Any], store: bool,
                   database_url: str | None = None):
    """``(preset, save)`` for a steering request: the stored preset it names (``save`` None),
    or a preset never saved holding the hand-picked ``features`` of ``info`` with ``save``, a
    function that returns the scratch preset version holding them (its latest version when
    that holds the same features, method and generation settings, else a new version), or
    None on a read-only server. The scratch version is saved only once the run has passed
    every check (see :class:`SteerStream`), so a refused request writes nothing."""
    from saereg.analysis.stats import check_index
    from saereg.analysis.steering import (GENERATION_DEFAULTS, STEER_METHODS, Preset,
                                          create_preset, get_preset)

    if preset:
        if features:
            raise UsageError("give features or a preset, not both")
        return get_preset(preset, database_url=database_url), None
    if not features:
        raise UsageError("pick at least one feature (index and strength), or a preset")
    method = method or "add"
    if method not in STEER_METHODS:
        raise UsageError(f"method must be one of {', '.join(STEER_METHODS)}, got {method!r}")
    given = {k: v for k, v in generation.items() if v is not None}
    gen = {k: v for k, v in {**GENERATION_DEFAULTS, **given}.items() if k != "seed"}
    feats = []
    for index, strength in features:
        check_index(info, index)
        feats.append({"sae": info.ref, "version_id": info.id, "hook": info.hook,
                      "index": int(index), "strength": float(strength)})
    draft = Preset("unsaved", 0, info.ref, info.model, method, feats,
                   {**GENERATION_DEFAULTS, **gen})
    if not store:
        return draft, None

    def save():
        name = SCRATCH.format(name=info.name, number=info.number)[:128]
        try:
            latest = get_preset(name, database_url=database_url)
        except NotFoundError:
            latest = None
        wanted = [(info.id, f["index"], f["strength"]) for f in feats]
        if latest is not None and latest.method == method and wanted == [
                (f["version_id"], f["index"], f["strength"]) for f in latest.features] and all(
                latest.generation.get(k) == v for k, v in gen.items()):
            return latest
        return create_preset(name, info.ref, [(None, i, s) for i, s in features],
                             method=method, generation=gen, database_url=database_url)

    return draft, save


class SteerStream:
    """One steering run in a worker thread, its pieces queued for the request's event loop."""

    def __init__(self, models, preset, prompt: str, *, seed: int | None,
                 generation: dict[str, Any], store: bool, save=None,
                 database_url: str | None = None):
        self.models, self.preset, self.prompt, self.save = models, preset, prompt, save
        self.seed, self.generation, self.store = seed, generation, store
        self.database_url = database_url
        self.cancelled = threading.Event()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self._first: tuple[str, Any] | None = None
        self.thread = threading.Thread(target=self._work, name="saereg-steer", daemon=True)

    def _emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    def _work(self) -> None:
        from saereg.analysis.steering import steer

        try:
            with self.models.using(self.preset.model, self.cancelled) as lm:
                def streamer(side: str) -> PieceStreamer:
                    if side == "default" and self.save is not None:
                        saved = self.save()  # every check has passed: keep the features
                        self.preset.id, self.preset.name = saved.id, saved.name
                        self.preset.number = saved.number
                    self._emit("side", side)
                    return PieceStreamer(lm.tokenizer, lambda text: self._emit(
                        "piece", {"side": side, "text": text}), self.cancelled)

                result = steer(self.preset, self.prompt, seed=self.seed, lm=lm,
                               generation=self.generation, store=self.store,
                               database_url=self.database_url,
                               load=lambda ref: self.models.sae(ref, lm.device),
                               streamer=streamer)
            self._emit("done", result)
        except Cancelled:
            self._emit("cancelled", None)
        except BaseException as e:  # noqa: BLE001 - handed to the request, which answers it
            self._emit("error", e)

    async def start(self) -> None:
        """Start the run and wait until it has passed every check (or failed one: then the
        error is raised here, before any event is sent)."""
        self.thread.start()
        kind, value = await self.queue.get()
        if kind == "error":
            raise value
        self._first = (kind, value)

    async def events(self) -> AsyncIterator[str]:
        from saereg.analysis.web.errors import describe

        try:
            item = self._first
            while item is not None:
                kind, value = item
                if kind == "piece":
                    yield sse(value)
                elif kind == "done":
                    yield sse({"run_id": value.run_id or None, "preset": value.preset,
                               "seed": value.seed, "default": value.default,
                               "steered": value.steered}, event="done")
                    return
                elif kind == "error":
                    yield sse({"detail": describe(value)[1]}, event="error")
                    return
                elif kind == "cancelled":
                    return
                item = await self.queue.get()
        finally:
            self.cancelled.set()  # the client went away, or the run is over
