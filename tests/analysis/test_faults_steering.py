"""Non-finite and out-of-range numbers in steering, search and labels, on SQLite and PostgreSQL.

Cases (each asserts the one-line error, the exit code, and that catalog row counts, stored
blobs and MLflow model versions are unchanged):

- a preset with a NaN or infinite strength is refused (library, and `preset create --strength`
  exits 2 naming --strength);
- a preset with a NaN or negative temperature is refused (`--temperature` named, exit 2);
- steering with a stored preset whose strength is not finite (a catalog written before the
  check: NaN on SQLite; on PostgreSQL, whose JSONB holds no NaN, 1e400, which reads as inf) is
  refused naming the preset, exit 1, and no steering run is stored;
- steering with a stored preset whose temperature is NaN is refused likewise;
- editing such a stored preset without giving new features does not copy the bad strength;
- `search --min-rate nan` (and inf, and a rate outside 0..1) exits 2 naming --min-rate;
- `search --min-rate` above `--max-rate` exits 2 naming --min-rate;
- a label longer than the documented limit is refused.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from catalog_helpers import catalog_state, error_line
from click.testing import CliRunner
from sqlalchemy import text

from saereg.analysis import labels
from saereg.analysis.search import search_labels
from saereg.analysis.steering import create_preset, steer
from saereg.commands.main import cli
from saereg.registry.catalog import db
from saereg.registry.catalog.feature_schema import MAX_LABEL_CHARS
from saereg.registry.catalog.writes import Catalog
from saereg.registry.errors import ConfigError, SaeRegError, UsageError

PROMPT = "Should I travel by plane or by"






def one_error(result, code: int) -> str:
    """The single ``Error:`` line of a CLI result that exited with ``code`` (warnings may
    stand beside it)."""
    return error_line(result, code, alone=False)


def plant(preset_id: int, column: str, value: dict | list, backend: str) -> None:
    """Overwrite a stored preset's JSON column as an older release could have written it:
    ``value`` serialised with Python's json (NaN as ``NaN``). PostgreSQL's JSONB refuses NaN,
    so there an infinite value is written as 1e400 (which reads back as inf)."""
    raw = json.dumps(value)
    if backend == "postgresql":
        raw = raw.replace("NaN", "1e400").replace("Infinity", "1e400")
        sql = f"UPDATE steering_presets SET {column} = CAST(:v AS jsonb) WHERE id = :id"
    else:
        sql = f"UPDATE steering_presets SET {column} = :v WHERE id = :id"
    with db.get_engine().begin() as conn:
        conn.execute(text(sql), {"v": raw, "id": preset_id})


@pytest.fixture
def before(tiny_sae, mlflow_store):
    create_preset("ok", tiny_sae, [(None, 1, 4.0)])
    return catalog_state(Catalog().store, mlflow_store)


@pytest.mark.parametrize("value, shown", [(math.nan, "nan"), (math.inf, "inf")])
def test_preset_with_a_non_finite_strength_is_refused(tiny_sae, mlflow_store, before, value,
                                                      shown):
    message = f"strength of feature 5 must be a finite number, got {shown}"
    with pytest.raises(ConfigError, match=message):
        create_preset("bad", tiny_sae, [(None, 5, value)])
    with pytest.raises(ConfigError, match=message):
        create_preset("ok", features=[(None, 5, value)])  # a new version of an existing one
    line = one_error(CliRunner().invoke(cli, ["preset", "create", "bad", "--sae", tiny_sae,
                                              "--feature", "5", "--strength", shown]), 2)
    assert f"--{message}" in line
    assert catalog_state(Catalog().store, mlflow_store) == before


@pytest.mark.parametrize("value, says", [("nan", "must be a finite number, got nan"),
                                         ("-inf", "must be a finite number, got -inf"),
                                         ("-1", "must be >= 0, got -1")])
def test_preset_with_a_bad_temperature_is_refused(tiny_sae, mlflow_store, before, value, says):
    with pytest.raises(ConfigError, match=f"temperature {says}"):
        create_preset("bad", tiny_sae, [(None, 5, 2.0)],
                      generation={"temperature": float(value)})
    line = one_error(CliRunner().invoke(cli, ["preset", "create", "bad", "--sae", tiny_sae,
                                              "--feature", "5", "--temperature", value]), 2)
    assert f"--temperature {says}" in line
    assert catalog_state(Catalog().store, mlflow_store) == before


def test_steering_with_a_stored_non_finite_strength_is_refused(tiny_sae, mlflow_store, before,
                                                               backend, tiny_lm):
    p = create_preset("old", tiny_sae, [(None, 5, 2.0)])
    plant(p.id, "features", [{**p.features[0], "strength": math.nan}], backend)
    after_plant = catalog_state(Catalog().store, mlflow_store)
    shown = "nan" if backend == "sqlite" else "inf"
    message = (f"preset old@1 holds strength {shown} for feature 5; a strength must be a finite "
               "number")
    with pytest.raises(SaeRegError, match=message):
        steer("old", PROMPT, lm=tiny_lm)
    line = one_error(CliRunner().invoke(cli, ["steer", "--preset", "old", PROMPT]), 1)
    assert message in line and "--strength" in line
    assert catalog_state(Catalog().store, mlflow_store) == after_plant  # no steering run stored


def test_steering_with_a_stored_nan_temperature_is_refused(tiny_sae, mlflow_store, before,
                                                           backend, tiny_lm):
    p = create_preset("old", tiny_sae, [(None, 5, 2.0)])
    plant(p.id, "generation", {**p.generation, "temperature": math.nan}, backend)
    after_plant = catalog_state(Catalog().store, mlflow_store)
    shown = "nan" if backend == "sqlite" else "inf"
    message = (f"preset old@1 holds an invalid generation setting: temperature must be a finite "
               f"number, got {shown}")
    with pytest.raises(SaeRegError, match=message):
        steer("old", PROMPT, lm=tiny_lm)
    line = one_error(CliRunner().invoke(cli, ["steer", "--preset", "old", PROMPT]), 1)
    assert message in line
    assert catalog_state(Catalog().store, mlflow_store) == after_plant
    # a temperature given now replaces the stored one: that run goes ahead
    r = steer("old", PROMPT, lm=tiny_lm, generation={"temperature": 0.0, "max_new_tokens": 2},
              store=False)
    assert r.preset == "old@1"


def test_editing_a_stored_non_finite_preset_does_not_copy_it(tiny_sae, mlflow_store, before,
                                                             backend):
    p = create_preset("old", tiny_sae, [(None, 5, 2.0)])
    plant(p.id, "features", [{**p.features[0], "strength": math.inf}], backend)
    after_plant = catalog_state(Catalog().store, mlflow_store)
    with pytest.raises(SaeRegError, match="preset old@1 holds strength inf for feature 5"):
        create_preset("old", method="clamp")
    line = one_error(CliRunner().invoke(cli, ["preset", "create", "old", "--method", "clamp"]),
                     1)
    assert "preset old@1 holds strength inf" in line
    assert catalog_state(Catalog().store, mlflow_store) == after_plant
    fixed = create_preset("old", features=[(None, 5, 3.0)])  # new features: a good version
    assert (fixed.number, fixed.features[0]["strength"]) == (2, 3.0)


@pytest.mark.parametrize("value, says", [("nan", "must be a finite number, got nan"),
                                         ("inf", "must be a finite number, got inf"),
                                         ("1.5", "must be in 0..1, got 1.5")])
def test_search_min_rate_that_is_not_a_rate_is_refused(tiny_sae, mlflow_store, before, value,
                                                       says):
    labels.add_label(tiny_sae, 3, "travel by train")
    counts = catalog_state(Catalog().store, mlflow_store)
    with pytest.raises(ConfigError, match=f"min_rate {says}"):
        search_labels("travel", min_rate=float(value))
    with pytest.raises(ConfigError, match=f"max_rate {says}"):
        search_labels("travel", max_rate=float(value))
    line = one_error(CliRunner().invoke(cli, ["search", "travel", "--min-rate", value]), 2)
    assert f"--min-rate {says}" in line
    line = one_error(CliRunner().invoke(cli, ["search", "travel", "--max-rate", value]), 2)
    assert f"--max-rate {says}" in line
    assert catalog_state(Catalog().store, mlflow_store) == counts


def test_search_min_rate_above_max_rate_is_refused(tiny_sae, mlflow_store, before):
    with pytest.raises(ConfigError, match="min_rate 0.5 is above max_rate 0.1"):
        search_labels("travel", min_rate=0.5, max_rate=0.1)
    line = one_error(CliRunner().invoke(cli, ["search", "travel", "--min-rate", "0.5",
                                              "--max-rate", "0.1"]), 2)
    assert "--min-rate 0.5 is above max_rate 0.1" in line
    assert search_labels("travel", min_rate=0.1, max_rate=0.1) == []  # equal bounds are fine
    assert catalog_state(Catalog().store, mlflow_store) == before


def test_label_longer_than_the_limit_is_refused(tiny_sae, mlflow_store, before):
    long = "word " * (MAX_LABEL_CHARS // 5 + 1)
    message = f"a label is at most {MAX_LABEL_CHARS} characters"
    with pytest.raises(UsageError, match=message):
        labels.add_label(tiny_sae, 3, long)
    assert message in one_error(CliRunner().invoke(cli, ["label", tiny_sae, "3", long]), 2)
    assert catalog_state(Catalog().store, mlflow_store) == before


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x9b"])
def test_label_with_a_control_character_is_refused(tiny_sae, mlflow_store, before, char):
    """NUL (which PostgreSQL refuses in text), a bell, an escape, a C1 control: refused by
    name on both databases, nothing written; whitespace controls only fold into spaces."""
    message = f"a label may not hold control characters (found {char!r})"
    with pytest.raises(UsageError, match=re.escape(message)):
        labels.add_label(tiny_sae, 3, f"travel{char}by train")
    line = one_error(CliRunner().invoke(cli, ["label", tiny_sae, "3", f"a{char}b"]), 2)
    assert message in line
    assert catalog_state(Catalog().store, mlflow_store) == before
    assert labels.add_label(tiny_sae, 3, "travel\tby\r\ntrain").text == "travel by train"
