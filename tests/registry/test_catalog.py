"""The catalog on SQLite and PostgreSQL with a real MLflow store: registering from a folder (this
project's and SAELens's) and from a training-shaped MLflow run records config, metrics,
lineage, files with their sha256, and one feature row per latent with its firing rate; every
version is mirrored as an MLflow model version (source: the run's artifact or the stored
files); load_sae returns the same weights on the asked dtype; aliases move with a history and
are mirrored; deprecated versions load with a warning and are never the default; versions are
immutable; list filters and diff work; export writes a folder SAELens loads."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from catalog_helpers import log_training_run, make_sae_folder, sha256_of
from sqlalchemy import select

from saereg.registry.api import export_sae, load_sae
from saereg.registry.catalog import db
from saereg.registry.catalog.schema import Feature, SAEVersion
from saereg.registry.errors import DeprecatedVersionWarning, SaeRegError, UsageError
from saereg.registry.sae.folder import load_log_sparsity
from saereg.registry.sae.folder import load_sae as load_folder


def features_of(version_id: int) -> list[tuple[int, float | None]]:
    with db.session() as s:
        return list(s.execute(select(Feature.feature_index, Feature.log10_firing_rate)
                              .where(Feature.version_id == version_id)
                              .order_by(Feature.feature_index)).tuples())


def test_register_folder_records_files_features_and_mirror(catalog, mlflow_store, tmp_path):
    folder = make_sae_folder(tmp_path / "sae", d_sae=64, seed=1)
    v = catalog.register_folder(folder, "tiny-l1", tags={"sweep": "a"}, note="first try")
    assert (v.ref, v.model, v.hook, v.architecture, v.d_in, v.d_sae) == (
        "tiny-l1@1", "tiny-llama", "model.layers.1", "topk", 16, 64)
    assert v.status == "ready" and v.source_kind == "folder" and v.mlflow_run_id is None
    assert v.tags == {"sweep": "a"} and v.notes[0][2] == "first try"
    assert {f.name: (f.sha256, f.size) for f in v.files} == {
        name: (sha256_of(folder / name), (folder / name).stat().st_size)
        for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")}
    assert v.config == json.loads((folder / "cfg.json").read_text())

    expected = load_log_sparsity(folder).tolist()
    rows = features_of(v.id)
    assert [i for i, _ in rows] == list(range(64))
    assert [r for _, r in rows] == pytest.approx(expected)

    mv = mlflow_store.get_model_version("tiny-l1", v.mlflow_model_version)
    assert mv.tags["saereg.uid"] == v.uid and mv.tags["saereg.version"] == "1"
    assert mv.tags["sweep"] == "a" and mv.run_id in (None, "")
    assert mv.source.startswith(catalog.store.url) and "/trees/" in mv.source
    import mlflow

    got = mlflow.artifacts.download_artifacts(artifact_uri=mv.source,
                                              dst_path=str(tmp_path / "from-mlflow"))
    assert sha256_of(Path(got) / "sae_weights.safetensors") == sha256_of(
        folder / "sae_weights.safetensors")

    sae = load_sae("tiny-l1", dtype="float64")
    original = load_folder(folder)
    assert sae.W_enc.dtype == torch.float64
    torch.testing.assert_close(sae.W_enc.float(), original.W_enc)
    assert sae.cfg.metadata["saereg_ref"] == "tiny-l1@1"


def test_register_from_run_keeps_lineage(catalog, mlflow_store, tmp_path):
    rid = log_training_run(mlflow_store, tmp_path, seed=0, k=4)
    v1 = catalog.register_run(rid, "tiny-l1")
    assert v1.mlflow_run_id == rid and v1.source_kind == "mlflow-run"
    assert v1.source_uri == f"runs:/{rid}/sae"
    assert v1.dataset == "saereg:default-corpus" and v1.training_tokens == 32768
    assert v1.context_size == 64 and v1.params["sae.k"] == "4"
    assert v1.key_metrics == {"explained_variance": 0.8, "l0": 4.0, "ce_loss_score": 0.9,
                              "dead_fraction": 0.02}
    assert v1.metrics["eval/kl_div"] == pytest.approx(0.05)
    mv = mlflow_store.get_model_version("tiny-l1", v1.mlflow_model_version)
    assert mv.source == f"runs:/{rid}/sae" and mv.run_id == rid
    assert v1.store_tree is None

    rid2 = log_training_run(mlflow_store, tmp_path, seed=1, k=8,
                            metrics={"eval/explained_variance": 0.85})
    v2 = catalog.register_run(rid2, "tiny-l1", parent="tiny-l1@1", note="k=8")
    assert v2.number == 2 and v2.parent == "tiny-l1@1"
    d = catalog.diff("tiny-l1@1", "tiny-l1@2")
    changed = {k: (a, b) for k, a, b in d.config}
    assert changed["cfg.k"] == (4, 8) and changed["params.sae.k"] == ("4", "8")
    assert changed["lineage.parent"] == (None, "tiny-l1@1")
    assert "lineage.hook" not in changed and not d.same_weights
    ev = {k: (a, b) for k, a, b in d.metrics}["eval/explained_variance"]
    assert ev == (pytest.approx(0.8), pytest.approx(0.85))


def test_folder_from_a_known_run_links_it(catalog, mlflow_store, tmp_path):
    rid = log_training_run(mlflow_store, tmp_path, seed=3)
    v = catalog.register_folder(tmp_path / rid, "tiny-l1")
    assert v.mlflow_run_id == rid and v.key_metrics["ce_loss_score"] == 0.9
    assert v.source_kind == "folder" and v.store_tree  # MLflow points at the stored files


def test_saelens_folder(catalog, mlflow_store, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    cfg = sae_lens.JumpReLUSAEConfig(d_in=16, d_sae=48)
    cfg.metadata.model_name, cfg.metadata.hook_name = "gpt2", "blocks.3.hook_resid_post"
    theirs = sae_lens.SAE.from_dict(cfg.to_dict())
    with torch.no_grad():
        theirs.threshold.fill_(0.1)
    theirs.save_model(str(tmp_path / "sl"))
    v = catalog.register_folder(tmp_path / "sl", "gpt2-l3-jr")
    assert (v.model, v.hook, v.architecture, v.d_sae) == ("gpt2", "blocks.3.hook_resid_post",
                                                          "jumprelu", 48)
    assert [r for _, r in features_of(v.id)] == [None] * 48  # SAELens wrote no sparsity
    ours = load_sae("gpt2-l3-jr@1")
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)


def test_aliases_move_mirror_and_keep_history(catalog, mlflow_store, tmp_path):
    for seed in range(3):
        catalog.register_folder(make_sae_folder(tmp_path / f"s{seed}", seed=seed), "sae-a")
    catalog.set_alias("sae-a", "prod", 1)
    catalog.set_alias("sae-a", "staging", "3")
    assert catalog.get("sae-a@prod").number == 1
    catalog.set_alias("sae-a", "prod", "staging")  # another alias as the target
    assert catalog.get("sae-a@prod").number == 3
    assert mlflow_store.get_registered_model("sae-a").aliases == {"prod": 3, "staging": 3}
    assert catalog.unset_alias("sae-a", "staging") == 3
    assert mlflow_store.get_registered_model("sae-a").aliases == {"prod": 3}
    events = [(e.alias, e.action, e.previous, e.version)
              for e in catalog.alias_history("sae-a")]
    assert events == [("prod", "set", None, 1), ("staging", "set", None, 3),
                      ("prod", "set", 1, 3), ("staging", "unset", 3, None)]
    assert catalog.get("sae-a@3").aliases == ["prod"]


def test_deprecated_versions_warn_and_are_not_the_default(catalog, mlflow_store, tmp_path):
    for seed in range(2):
        catalog.register_folder(make_sae_folder(tmp_path / f"s{seed}", seed=seed), "sae-d")
    catalog.set_alias("sae-d", "prod", 2)
    v = catalog.deprecate("sae-d@2", "dead latents above 30%; use sae-d@1")
    assert v.status == "deprecated" and "30%" in v.deprecation_reason
    assert catalog.get("sae-d").number == 1  # NAME skips deprecated versions
    with pytest.warns(DeprecatedVersionWarning, match="sae-d@2 is deprecated: dead latents"):
        load_sae("sae-d@prod")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_sae("sae-d")  # version 1: no warning
    with pytest.raises(UsageError, match="already deprecated"):
        catalog.deprecate("sae-d@2", "again")
    with pytest.raises(UsageError, match="deprecated"):
        catalog.set_alias("sae-d", "staging", 2)
    mv = mlflow_store.get_model_version("sae-d", v.mlflow_model_version)
    assert mv.tags["saereg.status"] == "deprecated"
    catalog.deprecate("sae-d@1", "superseded")
    assert catalog.get("sae-d").number == 2  # all deprecated: the newest
    assert [r.number for r in catalog.list(name="sae-d")] == [1, 2]  # never deleted


def test_versions_are_immutable(catalog, mlflow_store, tmp_path):
    catalog.register_folder(make_sae_folder(tmp_path / "s"), "sae-i")
    with pytest.raises(SaeRegError, match="immutable"):
        with db.session(write=True) as s:
            v = s.scalar(select(SAEVersion))
            v.metrics = {"eval/explained_variance": 0.99}
    assert catalog.get("sae-i@1").metrics == {}


def test_list_filters_and_key_metrics(catalog, mlflow_store, tmp_path):
    rid = log_training_run(mlflow_store, tmp_path, hook="model.layers.2")
    catalog.register_run(rid, "l2-topk", tags={"sweep": "s1"})
    catalog.register_folder(make_sae_folder(tmp_path / "a", arch="relu"), "l1-relu",
                            tags={"sweep": "s2"})
    catalog.register_folder(make_sae_folder(tmp_path / "b", model="other-lm"), "o-topk")
    catalog.register_folder(make_sae_folder(tmp_path / "c", arch="relu", seed=2), "l1-relu")

    def refs(**kw):
        return [r.ref for r in catalog.list(**kw)]

    assert refs() == ["l1-relu@1", "l1-relu@2", "l2-topk@1", "o-topk@1"]
    assert refs(model="tiny-llama", architecture="relu") == ["l1-relu@1", "l1-relu@2"]
    assert refs(hook="model.layers.2") == ["l2-topk@1"]
    assert refs(hook="model.layers.*", model="other*") == ["o-topk@1"]
    assert refs(tags={"sweep": "s1"}) == ["l2-topk@1"]
    assert refs(tags={"sweep": None}) == ["l1-relu@1", "l2-topk@1"]
    assert refs(latest=True) == ["l1-relu@2", "l2-topk@1", "o-topk@1"]
    row = catalog.list(name="l2-topk")[0]
    assert (row.explained_variance, row.l0, row.ce_loss_score, row.dead_fraction) == (
        0.8, 4.0, 0.9, 0.02)


def test_export_writes_a_verified_saelens_folder(catalog, mlflow_store, tmp_path):
    folder = make_sae_folder(tmp_path / "s", seed=5)
    catalog.register_folder(folder, "sae-e")
    out = export_sae("sae-e@1", tmp_path / "out")
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        assert sha256_of(out / name) == sha256_of(folder / name)
        assert not (out / name).is_symlink()
    prov = json.loads((out / "saereg.json").read_text())
    assert prov["ref"] == "sae-e@1"
    with pytest.raises(UsageError, match="already exists"):
        export_sae("sae-e@1", tmp_path / "out")
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(out))
    x = torch.randn(4, 16)
    torch.testing.assert_close(theirs.encode(x), load_folder(folder).encode(x))


def test_tags_and_notes_after_registration(catalog, mlflow_store, tmp_path):
    v = catalog.register_folder(make_sae_folder(tmp_path / "s"), "sae-t", tags={"a": "1"})
    v = catalog.tag("sae-t@1", {"a": "2", "reviewed": "yes"})
    assert v.tags == {"a": "2", "reviewed": "yes"}
    mv = mlflow_store.get_model_version("sae-t", v.mlflow_model_version)
    assert mv.tags["a"] == "2" and mv.tags["reviewed"] == "yes"
    v = catalog.add_note("sae-t", "looks good on layer 1")
    assert [n[2] for n in v.notes] == ["looks good on layer 1"]
