"""Non-finite numbers and unchecked values at registration and load, on SQLite and PostgreSQL.

Cases (each asserts the one-line error, the exit code, and that catalog row counts, stored
blobs and MLflow model versions are unchanged):

- weights holding NaN, or inf, are refused at registration, naming the tensor and the file;
- a stored version whose weights decode to NaN (registered by a release without that check) is
  refused at load, naming the version's file and the tensor; `sae convert` writes nothing;
- a cfg.json holding NaN (which JSON cannot hold) is refused, naming the key;
- a sparsity file holding NaN is refused;
- a NaN metric given to register_from_folder is refused, naming the metric;
- a NaN metric of an MLflow run is a legitimate MLflow value: the version registers without it,
  with a warning naming it, and its key-metric column holds NULL rather than NaN;
- a note longer than the documented limit is refused at registration and by `sae note`;
- a cfg.json without `architecture` (SAELens before version 6) registers as relu with a warning
  naming the file and the assumption;
- an unknown architecture is refused, listing the known ones.
"""

from __future__ import annotations

import json
import math

import pytest
from catalog_helpers import catalog_state, error_line, log_training_run, make_sae_folder
from click.testing import CliRunner

from saereg.commands.main import cli
from saereg.registry.api import load_sae, register_from_folder
from saereg.registry.catalog.writes import MAX_NOTE_CHARS
from saereg.registry.errors import ConfigError, InputWarning, SAEFormatError, UsageError






def one_error(result, code: int) -> str:
    """The single ``Error:`` line of a CLI result that exited with ``code`` (warnings may
    stand beside it)."""
    return error_line(result, code, alone=False)


def poison(folder, tensor: str, value: float):
    """Write ``value`` into one element of ``tensor`` of the folder's weights file."""
    from safetensors.torch import load_file, save_file

    path = folder / "sae_weights.safetensors"
    tensors = load_file(str(path))
    tensors[tensor].view(-1)[3] = value
    save_file(tensors, str(path))
    return folder


@pytest.fixture
def before(catalog, mlflow_store, tmp_path):
    """A catalog holding one good version (so "unchanged" is not just "empty")."""
    catalog.register_folder(make_sae_folder(tmp_path / "good"), "good")
    return catalog_state(catalog.store, mlflow_store)


@pytest.mark.parametrize("tensor, value, says", [("W_enc", math.nan, "1 NaN value"),
                                                  ("b_dec", math.inf, "1 infinite value")])
def test_weights_holding_nan_or_inf_are_refused_at_registration(catalog, mlflow_store, before,
                                                                tmp_path, tensor, value, says):
    folder = poison(make_sae_folder(tmp_path / "bad"), tensor, value)
    weights = folder / "sae_weights.safetensors"
    with pytest.raises(SAEFormatError, match=f"tensor {tensor} holds {says}") as e:
        register_from_folder(folder, "bad")
    assert str(weights) in str(e.value) and "refusing to register it" in str(e.value)
    line = one_error(CliRunner().invoke(cli, ["sae", "register", str(folder), "--name", "bad"]),
                     1)
    assert f"tensor {tensor} holds {says}" in line and str(weights) in line
    assert catalog_state(catalog.store, mlflow_store) == before


def test_stored_weights_that_decode_to_nan_are_refused_at_load(catalog, mlflow_store, tmp_path,
                                                               monkeypatch):
    from saereg.registry.catalog import sources

    folder = poison(make_sae_folder(tmp_path / "old"), "W_dec", math.nan)
    with monkeypatch.context() as m:  # a release without the registration check stored it
        m.setattr(sources, "check_finite_tensors", lambda *a, **k: None)
        catalog.register_folder(folder, "old")
    before = catalog_state(catalog.store, mlflow_store)
    expected = "sae_weights.safetensors of old@1: tensor W_dec holds 1 NaN value; refusing to load"
    with pytest.raises(SAEFormatError, match=expected):
        load_sae("old@1")
    dest = tmp_path / "converted"
    line = one_error(CliRunner().invoke(cli, ["sae", "convert", "old@1", str(dest)]), 1)
    assert expected in line
    assert not dest.exists()
    with pytest.raises(SAEFormatError, match="tensor W_dec holds 1 NaN value"):
        load_sae(folder)  # the folder itself, loaded directly
    assert catalog_state(catalog.store, mlflow_store) == before


def test_cfg_json_holding_nan_is_refused(catalog, mlflow_store, before, tmp_path):
    folder = make_sae_folder(tmp_path / "bad")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["training_tokens"] = math.nan
    (folder / "cfg.json").write_text(json.dumps(cfg))  # Python writes NaN; JSON has none
    with pytest.raises(SAEFormatError, match=r"cfg.json: metadata.training_tokens is nan"):
        register_from_folder(folder, "bad")
    line = one_error(CliRunner().invoke(cli, ["sae", "register", str(folder), "--name", "bad"]),
                     1)
    assert "metadata.training_tokens is nan" in line
    assert catalog_state(catalog.store, mlflow_store) == before


def test_sparsity_holding_nan_is_refused(catalog, mlflow_store, before, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = make_sae_folder(tmp_path / "bad")
    path = folder / "sparsity.safetensors"
    rates = load_file(str(path))
    rates["sparsity"][5] = math.nan
    save_file(rates, str(path))
    with pytest.raises(SAEFormatError, match="sparsity holds 1 NaN or \\+inf values"):
        register_from_folder(folder, "bad")
    assert catalog_state(catalog.store, mlflow_store) == before


def test_nan_metric_given_to_register_is_refused_naming_it(catalog, mlflow_store, before,
                                                           tmp_path):
    folder = make_sae_folder(tmp_path / "s")
    with pytest.raises(ConfigError, match=r"metrics\['eval/l0'\] must be a finite number, "
                                          r"got nan"):
        register_from_folder(folder, "m", metrics={"eval/l0": math.nan, "eval/mse": 0.1})
    with pytest.raises(ConfigError, match=r"metrics\['x'\] must be a finite number, got -inf"):
        register_from_folder(folder, "m", metrics={"x": -math.inf})
    with pytest.raises(ConfigError, match=r"metrics\['x'\] must be a number, got 'high'"):
        register_from_folder(folder, "m", metrics={"x": "high"})
    assert catalog_state(catalog.store, mlflow_store) == before


def test_nan_metric_of_a_run_is_dropped_with_a_warning(catalog, mlflow_store, tmp_path):
    rid = log_training_run(mlflow_store, tmp_path, metrics={"eval/ce_loss_score": math.nan})
    assert math.isnan(mlflow_store.get_run(rid).data.metrics["eval/ce_loss_score"])
    with pytest.warns(InputWarning, match=rf"MLflow run {rid}: metrics "
                                          r"eval/ce_loss_score=nan are not finite numbers; not "
                                          r"copied to the catalog"):
        v = catalog.register_run(rid, "r")
    assert "eval/ce_loss_score" not in v.metrics
    assert v.metrics["eval/l0"] == 4.0
    assert v.key_metrics["ce_loss_score"] is None  # NULL in its column, not NaN
    assert v.key_metrics["explained_variance"] == 0.8
    result = CliRunner().invoke(cli, ["sae", "register", "--run", rid, "--name", "r"])
    assert result.exit_code == 0, result.output
    assert "warning: MLflow run" in result.output and "eval/ce_loss_score=nan" in result.output
    assert "Traceback" not in result.output


def test_note_longer_than_the_limit_is_refused(catalog, mlflow_store, before, tmp_path):
    folder = make_sae_folder(tmp_path / "s")
    long = "x" * (MAX_NOTE_CHARS + 1)
    message = f"a note is at most {MAX_NOTE_CHARS} characters, got {MAX_NOTE_CHARS + 1}"
    with pytest.raises(UsageError, match=message):
        register_from_folder(folder, "noted", note=long)
    line = one_error(CliRunner().invoke(cli, ["sae", "register", str(folder), "--name", "noted",
                                              "--note", long]), 2)
    assert message in line
    with pytest.raises(UsageError, match=message):
        catalog.add_note("good@1", long)
    assert message in one_error(CliRunner().invoke(cli, ["sae", "note", "good@1", long]), 2)
    assert catalog_state(catalog.store, mlflow_store) == before
    catalog.add_note("good@1", "x" * MAX_NOTE_CHARS)  # the limit itself is allowed
    assert len(catalog.get("good@1").notes) == 1


def test_cfg_without_architecture_registers_as_relu_with_a_warning(catalog, mlflow_store,
                                                                   tmp_path):
    folder = make_sae_folder(tmp_path / "legacy", arch="relu")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["architecture"], cfg["metadata"]["training_architecture"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    said = (f"{folder / 'cfg.json'} has no 'architecture'; reading it as the standard ReLU SAE, "
            "as SAELens configs before version 6 meant")
    with pytest.warns(InputWarning, match=said.replace(".", r"\.")):
        v = register_from_folder(folder, "legacy")
    assert v.architecture == "relu"
    result = CliRunner().invoke(cli, ["sae", "register", str(folder), "--name", "legacy"])
    assert result.exit_code == 0, result.output
    assert f"warning: {said}" in result.output and "registered legacy@2" in result.output
    assert load_sae("legacy@2").cfg.architecture == "relu"


def test_unknown_architecture_is_refused_listing_known_ones(catalog, mlflow_store, before,
                                                            tmp_path):
    folder = make_sae_folder(tmp_path / "odd")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["architecture"] = "sparse-coder"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    known = "known: standard, relu, topk, batchtopk, jumprelu, gated, matryoshka"
    with pytest.raises(SAEFormatError, match=f"unknown architecture 'sparse-coder'; {known}"):
        register_from_folder(folder, "odd")
    line = one_error(CliRunner().invoke(cli, ["sae", "register", str(folder), "--name", "odd"]),
                     1)
    assert "unknown architecture 'sparse-coder'" in line and known in line
    with pytest.raises(SAEFormatError, match=known):
        load_sae(folder)
    assert catalog_state(catalog.store, mlflow_store) == before
