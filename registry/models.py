"""Language-model names as the catalog records them, and which of them name one model.

The catalog keeps a model's name as it was given (a training job's ``--model``, a pulled SAE's
``model_name``), so one model can sit under several names: the packaged model as
``smollm2-135m`` and as ``HuggingFaceTB/SmolLM2-135M-Instruct``, a Hub id in two letter cases.
:func:`model_key` gives every name of one model the same key, and a filter by model
(``saereg sae list --model``, word and meaning search, the web app) takes every recorded name
with the key of the name asked for. Hub ids match in any letter case, as the Hub resolves
them; other names (local folders, files) only as written.
"""

from __future__ import annotations

import re

from sqlalchemy import text

PACKAGED_ALIAS = "smollm2-135m"
"""The packaged model's alias, the form every one of its names maps to."""
PACKAGED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGED_ALIASES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
_PACKAGED_KEYS = {*PACKAGED_ALIASES, PACKAGED_HUB_ID.casefold()}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def model_key(name: str) -> str:
    """One key for every name of one model: the packaged model's alias for any of its names,
    a Hub id (``org/name`` or a bare ``name``) case-folded, anything else stripped."""
    ref = name.strip()
    key = ref.casefold()
    if key in _PACKAGED_KEYS:
        return PACKAGED_ALIAS
    return key if _HUB_ID.fullmatch(ref) else ref


def same_model(a: str, b: str) -> bool:
    """Whether two recorded model names name one model."""
    return model_key(a) == model_key(b)


def model_ids(conn, name: str) -> list[int]:
    """Ids of the catalog's ``language_models`` rows whose names name the model ``name``
    (``conn``: a connection or session; the table holds one row per name, a few rows)."""
    want = model_key(name)
    return [i for i, n in conn.execute(text("SELECT id, name FROM language_models"))
            if model_key(n) == want]


def in_clause(column: str, ids: list[int]) -> str:
    """SQL for ``column`` being one of ``ids`` (integers from :func:`model_ids`), false for
    none."""
    return f"{column} IN ({', '.join(str(int(i)) for i in ids)})" if ids else "1 = 0"
