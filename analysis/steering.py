"""Steering presets as versioned data, a context manager that applies one to a loaded model,
and default-vs-steered generation with the same seed (stored with the preset version).

A preset is a name plus a version number (editing makes a new number), bound to one SAE
version; it holds features (SAE version, hook, index, strength), a method and generation
defaults. ``add`` adds ``strength * unit(W_dec[i])`` to the hook output at every position;
``clamp`` sets the feature's activation to ``strength`` (adds ``(strength - a) * W_dec[i]``).

Every number a preset holds must be finite: a strength or a temperature that is NaN or
infinite is refused where it enters (:func:`create_preset`, ``--strength``, ``--temperature``),
and a stored preset that holds one (written before this check, or by hand) is refused before
it steers anything, naming the preset and the value.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from saereg.registry.catalog import db
from saereg.registry.catalog.feature_schema import STEER_METHODS, SteeringPreset, SteeringRun
from saereg.registry.errors import ConfigError, NotFoundError, SaeRegError, UsageError
from saereg.registry.refs import validate_name
from saereg.registry.sae.checks import finite_number

GENERATION_DEFAULTS = {"max_new_tokens": 20, "temperature": 0.0, "top_k": 0, "seed": 0}


@dataclass
class Preset:
    name: str
    number: int
    ref: str
    model: str
    method: str
    features: list[dict[str, Any]]
    generation: dict[str, Any] = field(default_factory=dict)
    id: int = 0
    created_at: datetime | None = None
    created_by: str = ""


INTEGER_SETTINGS = {"max_new_tokens": 1, "top_k": 0, "seed": None}  # name -> smallest value


def _generation(gen: dict[str, Any] | None, base: dict[str, Any],
                stored: str | None = None) -> dict[str, Any]:
    """``base`` (the defaults, or a stored preset's settings) updated with ``gen``, checked:
    ``max_new_tokens`` >= 1, ``top_k`` >= 0, ``seed`` (integers), ``temperature`` a finite
    number >= 0. A bad value given in ``gen`` is a ConfigError naming the setting (the CLI
    shows its option); one that came from ``base`` when ``stored`` names a preset is an error
    naming that preset."""
    given = {k: v for k, v in (gen or {}).items() if v is not None}
    out = {**GENERATION_DEFAULTS, **base, **given}
    unknown = set(out) - set(GENERATION_DEFAULTS)
    if unknown:
        raise UsageError(f"unknown generation settings: {', '.join(sorted(unknown))}")
    try:
        for key, least in INTEGER_SETTINGS.items():
            value = out[key]
            if (isinstance(value, bool) or not isinstance(value, int)
                    or least is not None and value < least):
                at_least = "" if least is None else f" >= {least}"
                raise ConfigError(f"{key} must be an integer{at_least}, got {value!r}",
                                  field=key)
        out["temperature"] = finite_number(out["temperature"], "temperature", minimum=0)
    except ConfigError as e:
        if stored and e.field not in given:
            raise SaeRegError(f"preset {stored} holds an invalid generation setting: {e}; "
                              "create a new version of it with a valid value") from None
        raise
    return out


def _shown(value: Any) -> Any:
    """A stored value for a message: a number as a float (an integer beyond float range reads
    as inf), anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _stored(preset: Preset) -> str | None:
    """``NAME@N`` of a preset read from the catalog; None for one never saved (``id`` 0)."""
    return f"{preset.name}@{preset.number}" if preset.id else None


def _checked_features(features: list[dict[str, Any]],
                      stored: str | None) -> list[dict[str, Any]]:
    """The features of preset ``stored`` when each has an integer index and a finite number as
    its strength; otherwise an error naming the preset, the feature and the value (for a
    preset never saved, ``stored`` None, a ConfigError naming ``strength``)."""
    for feat in features:
        strength, index = feat.get("strength"), feat.get("index")
        if isinstance(index, bool) or not isinstance(index, int):
            raise SaeRegError(f"preset {stored} holds a feature with index {index!r}; create a "
                              "new version of it with valid --feature values")
        shown = _shown(strength)
        if isinstance(shown, float) and math.isfinite(shown):
            continue
        if stored is None:
            raise ConfigError(f"strength of feature {index} must be a finite number, got "
                              f"{shown!r}", field="strength")
        raise SaeRegError(f"preset {stored} holds strength {shown!r} for feature {index}; a "
                          "strength must be a finite number: create a new version of it with "
                          "a finite --strength")
    return features


def create_preset(name: str, sae: str | None = None,
                  features: list[tuple[str | None, int, float]] | None = None, *,
                  method: str | None = None, generation: dict[str, Any] | None = None,
                  database_url: str | None = None) -> Preset:
    """Create preset ``name`` (version 1) or its next version. ``features`` are
    ``(SAE ref or None for sae, index, strength)``; omitted parts are taken from the latest
    version when editing."""
    from saereg.analysis.stats import check_index
    from saereg.registry.api import get_version
    from saereg.registry.catalog.rows import current_user
    from saereg.registry.models import same_model

    validate_name(name)
    try:
        prev = get_preset(name, database_url=database_url)
    except NotFoundError:
        prev = None
    if prev is None and (sae is None or not features):
        raise UsageError("a new preset needs --sae and at least one --feature")
    sae = sae or prev.ref
    info = get_version(sae, database_url=database_url)
    method = method or (prev.method if prev else "add")
    if method not in STEER_METHODS:
        raise UsageError(f"method must be one of {', '.join(STEER_METHODS)}, got {method!r}")
    if features:
        feats = []
        for ref, index, strength in features:
            finfo = info if ref is None else get_version(ref, database_url=database_url)
            if not same_model(finfo.model, info.model):
                raise UsageError(f"feature {index} of {finfo.ref} belongs to model "
                                 f"{finfo.model!r}, but the preset steers {info.model!r}")
            check_index(finfo, index)
            strength = finite_number(strength, f"strength of feature {index}", field="strength")
            feats.append({"sae": finfo.ref, "version_id": finfo.id, "hook": finfo.hook,
                          "index": int(index), "strength": strength})
    else:
        feats = _checked_features(prev.features, f"{prev.name}@{prev.number}")
    gen = _generation(generation, prev.generation if prev else GENERATION_DEFAULTS,
                      f"{prev.name}@{prev.number}" if prev else None)

    def write() -> Preset:
        with db.session(database_url, write=True) as s:
            number = (s.scalar(select(func.max(SteeringPreset.number))
                               .where(SteeringPreset.name == name)) or 0) + 1
            row = SteeringPreset(name=name, number=number, version_id=info.id, method=method,
                                 features=feats, generation=gen, created_by=current_user())
            s.add(row)
            s.flush()
            return Preset(name, number, info.ref, info.model, method, feats, gen, row.id,
                          row.created_at, row.created_by)

    return db.retrying(write, what="creating a preset")


def get_preset(ref: str, *, database_url: str | None = None) -> Preset:
    """``NAME`` (latest version) or ``NAME@N``."""
    from saereg.registry.api import get_version
    from saereg.registry.catalog.schema import SAERecord, SAEVersion
    from saereg.registry.refs import format_ref

    name, _, num = ref.partition("@")
    if num and not num.isdigit():
        raise UsageError(f"preset reference must be NAME or NAME@N, got {ref!r}")
    with db.session(database_url) as s:
        q = select(SteeringPreset).where(SteeringPreset.name == name)
        q = q.where(SteeringPreset.number == int(num)) if num else q
        row = s.scalars(q.order_by(SteeringPreset.number.desc()).limit(1)).first()
        if row is None:
            known = s.scalars(select(SteeringPreset.name).distinct()).all()
            raise NotFoundError("preset", ref, known)
        sae_name, number = s.execute(
            select(SAERecord.name, SAEVersion.number).join(SAEVersion.sae)
            .where(SAEVersion.id == row.version_id)).one()
    info = get_version(format_ref(sae_name, number), database_url=database_url)
    return Preset(row.name, row.number, info.ref, info.model, row.method, row.features,
                  row.generation, row.id, row.created_at, row.created_by)


@contextlib.contextmanager
def apply_preset(lm, preset: Preset, *, database_url: str | None = None,
                 load: Callable[[str], Any] | None = None) -> Iterator[None]:
    """While active, every forward of ``lm`` is steered by ``preset``. ``load(ref)`` gives the
    SAE of a feature's version on ``lm``'s device (default: ``load_sae``; a server passes the
    SAEs it keeps loaded)."""
    import torch

    from saereg.registry.api import load_sae
    from saereg.registry.models import same_model
    from saereg.training.lm import splice

    if not same_model(lm.name, preset.model):
        raise UsageError(f"preset {preset.name}@{preset.number} steers {preset.model!r}, "
                         f"not {lm.name!r}")
    _checked_features(preset.features, _stored(preset))
    saes: dict[str, Any] = {}
    by_hook: dict[str, list[tuple[Any, dict]]] = {}
    for feat in preset.features:
        if feat["sae"] not in saes:
            saes[feat["sae"]] = (load(feat["sae"]) if load else
                                 load_sae(feat["sae"], device=lm.device,
                                          database_url=database_url))
        by_hook.setdefault(feat["hook"], []).append((saes[feat["sae"]], feat))

    def steer_fn(items):
        def fn(x: torch.Tensor) -> torch.Tensor:
            for sae, feat in items:
                d = sae.W_dec[feat["index"]].to(x.dtype)
                if preset.method == "add":
                    x = x + feat["strength"] * d / d.norm().clamp(min=1e-8)
                else:
                    a = sae.encode(x.to(sae.W_dec.dtype))[..., feat["index"]].to(x.dtype)
                    x = x + (feat["strength"] - a)[..., None] * d
            return x
        return fn

    with contextlib.ExitStack() as stack, torch.no_grad():
        for hook, items in by_hook.items():
            stack.enter_context(splice(lm, hook, steer_fn(items)))
        yield


@dataclass
class SteerResult:
    preset: str
    prompt: str
    seed: int
    default: str
    steered: str
    run_id: int


def _generate(lm, ids, gen: dict[str, Any], seed: int, streamer=None) -> str:
    import torch

    torch.manual_seed(seed)
    sample = float(gen["temperature"]) > 0
    kw = {"do_sample": sample, "max_new_tokens": int(gen["max_new_tokens"]),
          "pad_token_id": lm.tokenizer.eos_token_id or 0}
    if sample:
        kw.update(temperature=float(gen["temperature"]), top_k=int(gen["top_k"]) or None)
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    if streamer is not None:
        kw["streamer"] = streamer
    with torch.no_grad():
        out = lm.model.generate(ids.to(lm.device), attention_mask=torch.ones_like(ids).to(
            lm.device), **kw)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def steer(preset_ref: str | Preset, prompt: str, *, seed: int | None = None, lm=None,
          generation: dict[str, Any] | None = None, store: bool = True,
          database_url: str | None = None, load: Callable[[str], Any] | None = None,
          streamer: Callable[[str], Any] | None = None) -> SteerResult:
    """Default and steered continuations of ``prompt`` with the same seed; stored with the
    preset version unless ``store`` is False. ``preset_ref`` is ``NAME``, ``NAME@N`` or a
    :class:`Preset` (one never saved, ``id`` 0, is run but its runs are not stored).
    ``load`` is passed to :func:`apply_preset`; ``streamer(side)``, side ``default`` or
    ``steered``, gives a transformers streamer for that generation (called once the request
    has passed every check, just before generating)."""
    from saereg.analysis.lm import load_model
    from saereg.registry.catalog.rows import current_user

    preset = (preset_ref if isinstance(preset_ref, Preset)
              else get_preset(preset_ref, database_url=database_url))
    _checked_features(preset.features, _stored(preset))
    gen = _generation(generation, preset.generation, _stored(preset))
    seed = int(gen["seed"] if seed is None else seed)
    if not prompt or not prompt.strip():
        raise UsageError("steer needs a non-empty prompt")
    lm = lm or load_model(preset.model)
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] + int(gen["max_new_tokens"]) > lm.context_limit:
        raise UsageError(f"the prompt is {ids.shape[1]} tokens; with {gen['max_new_tokens']} new "
                         f"tokens that is longer than the model's context ({lm.context_limit})")
    default = _generate(lm, ids, gen, seed, streamer and streamer("default"))
    with apply_preset(lm, preset, database_url=database_url, load=load):
        steered = _generate(lm, ids, gen, seed, streamer and streamer("steered"))
    run_id = 0
    if store and preset.id:
        def write() -> int:
            with db.session(database_url, write=True) as s:
                row = SteeringRun(preset_id=preset.id, prompt=prompt, seed=seed,
                                  default_text=default, steered_text=steered,
                                  created_by=current_user())
                s.add(row)
                s.flush()
                return row.id

        run_id = db.retrying(write, what="storing a steering run")
    return SteerResult(f"{preset.name}@{preset.number}", prompt, seed, default, steered, run_id)


def stored_runs(preset_ref: str, *, database_url: str | None = None) -> list[SteeringRun]:
    preset = get_preset(preset_ref, database_url=database_url)
    with db.session(database_url) as s:
        return list(s.scalars(select(SteeringRun).where(SteeringRun.preset_id == preset.id)
                              .order_by(SteeringRun.id)).all())
