"""Bad input is refused with an error that lists what exists, and writes nothing: unknown SAE
names, versions and aliases; a folder whose cfg.json disagrees with its tensors (no row, no
blob, no MLflow model); an alias that looks like a version number; a name bound to another
model, hook or shape; unfinished or unknown runs; malformed references and hf:// references."""

from __future__ import annotations

import json

import pytest
from catalog_helpers import log_training_run, make_sae_folder, table_counts
from click.testing import CliRunner

from saereg.commands.main import cli
from saereg.registry.api import load_sae
from saereg.registry.errors import (HubError, NotFoundError, SAEFormatError, SAEMismatchError,
                                    SAENotFoundError, UsageError, VersionNotFoundError)
from saereg.registry.refs import parse_ref


def nothing_written(catalog, mlflow_store) -> bool:
    return (set(table_counts().values()) == {0}
            and not any(True for _ in catalog.store.iter_blobs())
            and mlflow_store.search_registered_models() == [])


@pytest.fixture
def three_versions(catalog, tmp_path):
    for seed in range(3):
        catalog.register_folder(make_sae_folder(tmp_path / f"s{seed}", seed=seed), "bar")
    catalog.set_alias("bar", "prod", 2)
    catalog.set_alias("bar", "staging", 3)
    return catalog


def test_unknown_name_version_alias_list_what_exists(three_versions, mlflow_store):
    cat = three_versions
    with pytest.raises(SAENotFoundError, match=r"unknown SAE 'foo'; known: bar"):
        cat.get("foo")
    with pytest.raises(SAENotFoundError, match=r"did you mean: bar"):
        cat.get("bars@1")
    expected = "SAE 'bar' has versions 1-3 and aliases prod, staging"
    with pytest.raises(VersionNotFoundError, match=expected):
        cat.get("bar@7")
    with pytest.raises(VersionNotFoundError, match=expected):
        cat.get("bar@canary")
    with pytest.raises(VersionNotFoundError, match=expected):
        cat.unset_alias("bar", "canary")
    with pytest.raises(VersionNotFoundError, match=expected):
        load_sae("bar@9")
    result = CliRunner().invoke(cli, ["sae", "show", "bar@7"])
    assert result.exit_code == 1 and expected in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_folder_disagreeing_with_its_tensors_writes_nothing(catalog, mlflow_store, tmp_path):
    folder = make_sae_folder(tmp_path / "s", d_sae=64)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_sae"] = 128
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=r"d_sae=128 but W_enc has shape \(16, 64\)"):
        catalog.register_folder(folder, "broken")
    cfg["d_sae"], cfg["d_in"] = 64, 32
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="d_in=32"):
        catalog.register_folder(folder, "broken")
    result = CliRunner().invoke(cli, ["sae", "register", str(folder), "--name", "broken"])
    assert result.exit_code == 1 and "refusing to register" in result.output
    assert nothing_written(catalog, mlflow_store)


def test_sparsity_of_the_wrong_length_writes_nothing(catalog, mlflow_store, tmp_path):
    folder = make_sae_folder(tmp_path / "s", d_sae=64)
    other = make_sae_folder(tmp_path / "o", d_sae=32)
    (folder / "sparsity.safetensors").write_bytes((other / "sparsity.safetensors").read_bytes())
    with pytest.raises(SAEFormatError, match="sparsity has shape"):
        catalog.register_folder(folder, "broken")
    assert nothing_written(catalog, mlflow_store)


@pytest.mark.parametrize("alias", ["3", "v3", "V12", "latest", "has space", "-x"])
def test_bad_aliases_are_refused(three_versions, alias):
    with pytest.raises(UsageError):
        three_versions.set_alias("bar", alias, 1)
    assert {e.alias for e in three_versions.alias_history("bar")} == {"prod", "staging"}


def test_alias_that_looks_like_a_version_cli_exit_2(three_versions):
    result = CliRunner().invoke(cli, ["sae", "alias", "set", "bar", "3", "1"])
    assert result.exit_code == 2 and "looks like a version number" in result.output


def test_name_bound_to_another_binding(catalog, mlflow_store, tmp_path):
    catalog.register_folder(make_sae_folder(tmp_path / "a"), "bound")
    counts = table_counts()
    for kw in ({"d_sae": 128}, {"hook": "model.layers.2"}, {"arch": "relu"},
               {"model": "other-lm"}):
        with pytest.raises(SAEMismatchError, match="is bound to model=tiny-llama"):
            catalog.register_folder(make_sae_folder(tmp_path / str(kw), **kw), "bound")
    assert table_counts() == counts
    assert len(list(catalog.store.iter_blobs())) == 3


def test_bad_runs_and_names(catalog, mlflow_store, tmp_path):
    with pytest.raises(NotFoundError, match="unknown MLflow run 'deadbeef'"):
        catalog.register_run("deadbeef", "x")
    rid = log_training_run(mlflow_store, tmp_path)
    mlflow_store.update_run(rid, status="FAILED")
    with pytest.raises(UsageError, match="is FAILED"):
        catalog.register_run(rid, "x")
    run = mlflow_store.create_run(mlflow_store.get_run(rid).info.experiment_id)
    mlflow_store.set_terminated(run.info.run_id)
    with pytest.raises(SAEFormatError, match="has no SAE folder"):
        catalog.register_run(run.info.run_id, "x")
    for name in ("", "a/b", "@x", "x" * 200, "-lead"):
        with pytest.raises(UsageError):
            catalog.register_folder(tmp_path, name)
    with pytest.raises(SAEFormatError, match="cfg.json is missing"):
        catalog.register_folder(tmp_path, "x")
    with pytest.raises(NotFoundError):
        catalog.register_folder(make_sae_folder(tmp_path / "p"), "x", parent="nope@1")
    assert nothing_written(catalog, mlflow_store)


def test_register_cli_needs_exactly_one_source(catalog, tmp_path):
    result = CliRunner().invoke(cli, ["sae", "register", "--name", "x"])
    assert result.exit_code == 2 and "exactly one" in result.output
    result = CliRunner().invoke(cli, ["sae", "register", str(tmp_path), "--run", "r",
                                      "--name", "x"])
    assert result.exit_code == 2


def test_reference_parsing(tmp_path):
    assert parse_ref("a@3").version == 3 and parse_ref("a@v3").version == 3
    assert parse_ref("a@prod").alias == "prod" and parse_ref("a").version is None
    assert parse_ref("a@latest").alias is None
    assert parse_ref(str(tmp_path)).kind == "dir"
    hub = parse_ref("hf://org/repo/l6@main")
    assert (hub.kind, hub.repo, hub.repo_path, hub.revision) == ("hub", "org/repo", "l6", "main")
    for bad in ("hf://org", "hf://org/../x", "hf://org/repo/../l6", "hf://org/repo@a..b"):
        with pytest.raises(UsageError):
            parse_ref(bad)
    for bad in ("a@", "a@0", "a@b@c", "./no/such/dir", "s3://bucket/x", "a b"):
        with pytest.raises(UsageError):
            parse_ref(bad)
    with pytest.raises(HubError, match="not in the local huggingface_hub cache"):
        load_sae("hf://org/repo/l6")  # offline (tests/conftest.py) and nothing cached
