"""Rules that live in one function each, pinned here: the ``hf://`` address
(``refs.format_hf_ref``, read back by ``parse_ref``); "looks like a path" (``refs.looks_like_path``,
for SAE references, datasets and models alike); the default corpus's recorded name
(``training.corpus``); the SAE weight-shape check (``sae.checks.check_shapes``, the same refusal
from the registration check, the folder loader and the foreign-format converter); the dtype map
(``sae.modules.torch_dtype``); and the migration head and current revision (``catalog.migrate``,
which ``db.ensure_schema`` reads)."""

from __future__ import annotations

import json

import pytest
import torch
from catalog_helpers import make_sae_folder

from saereg.registry.errors import ConfigError, ModelNotFoundError, SAEFormatError, UsageError
from saereg.registry.refs import format_hf_ref, looks_like_path, parse_ref

# -- the hf:// address --------------------------------------------------------------------------


@pytest.mark.parametrize(("repo", "path", "rev", "text"), [
    ("org/saes", "l6/topk", "abc123", "hf://org/saes/l6/topk@abc123"),
    ("org/saes", "", "v1", "hf://org/saes@v1"),
    ("org/saes", "/l6/", None, "hf://org/saes/l6"),
    ("org/saes", "", None, "hf://org/saes"),
])
def test_hf_ref_is_written_as_parse_ref_reads_it(repo, path, rev, text):
    assert format_hf_ref(repo, path, rev) == text
    ref = parse_ref(text)
    assert (ref.kind, ref.repo, ref.repo_path, ref.revision) == ("hub", repo, path.strip("/"), rev)


# -- looks like a path --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "sae", "hub"), [
    ("./my_sae", True, True), ("/data/saes/l6", True, True), ("~/saes", True, True),
    (".hidden", True, True), ("saes/l6", True, False), ("org/name/sub", True, True),
    ("l6-topk", False, False), ("l6-topk@3", False, False), ("HuggingFaceTB/SmolLM2", True, False),
])
def test_looks_like_path(text, sae, hub):
    assert looks_like_path(text) is sae
    assert looks_like_path(text, hub_ids=True) is hub


def test_every_reader_of_names_uses_the_path_rule(tmp_path, monkeypatch):
    from saereg.training.data import _looks_like_path
    from saereg.training.lm import load_lm

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="no such directory"):
        parse_ref("saes/l6")            # an SAE name never holds '/': a missing folder
    assert parse_ref("l6@2").kind == "catalog"
    (tmp_path / "saes" / "l6").mkdir(parents=True)
    assert parse_ref("saes/l6").kind == "dir"
    assert not _looks_like_path("org/dataset") and _looks_like_path("org/dataset/sub")
    assert _looks_like_path("notes.jsonl")  # a file type the data reader reads
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        load_lm("org/model/extra")      # two '/' is never a hub id


# -- the default corpus's name --------------------------------------------------------------------

def test_default_corpus_is_recorded_under_one_name():
    from saereg.training import job
    from saereg.training.corpus import DEFAULT_CORPUS_NAME, dataset_name, is_default_corpus

    assert DEFAULT_CORPUS_NAME == "saereg:default-corpus" == job.DEFAULT_CORPUS_NAME
    for default in (None, "", "default", DEFAULT_CORPUS_NAME):
        assert is_default_corpus(default) and dataset_name(default) == DEFAULT_CORPUS_NAME
    assert not is_default_corpus("./corpus.jsonl")
    assert dataset_name("./corpus.jsonl") == "./corpus.jsonl"


# -- the shape check ------------------------------------------------------------------------------

def test_expected_shapes_per_architecture():
    from saereg.registry.sae.checks import check_shapes, expected_shapes

    assert expected_shapes("topk", 4, 8) == {"W_enc": ((4, 8),), "W_dec": ((8, 4),),
                                             "b_dec": ((4,),), "b_enc": ((8,),)}
    assert expected_shapes("jumprelu", 4, 8)["threshold"] == ((8,), ())
    gated = expected_shapes("gated", 4, 8)
    assert "b_enc" not in gated and {"b_gate", "b_mag", "r_mag"} <= set(gated)
    good = {"W_enc": (4, 8), "W_dec": (8, 4), "b_dec": (4,), "b_enc": (8,), "threshold": ()}
    check_shapes("jumprelu", 4, 8, good, "here")  # a scalar threshold is allowed
    with pytest.raises(SAEFormatError, match=r"here: cfg.json says d_in=4, d_sae=8 but W_dec "
                                             r"has shape \(8, 5\) \(expected \(8, 4\)\)"):
        check_shapes("topk", 4, 8, {**good, "W_dec": (8, 5)}, "here")
    with pytest.raises(SAEFormatError, match="here lacks tensor threshold"):
        check_shapes("jumprelu", 4, 8, {k: v for k, v in good.items() if k != "threshold"},
                     "here")


def test_registration_loading_and_conversion_refuse_the_same_shapes(tmp_path):
    from saereg.registry.catalog.sources import read_folder
    from saereg.registry.sae.folder import load_sae
    from saereg.registry.sae.formats import _build

    folder = make_sae_folder(tmp_path / "s", d_in=16, d_sae=64)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_sae"] = 128
    (folder / "cfg.json").write_text(json.dumps(cfg))
    wrong = r"cfg.json says d_in=16, d_sae=128 but W_enc has shape \(16, 64\)"
    with pytest.raises(SAEFormatError, match=wrong + r".*refusing to register it"):
        read_folder(folder)
    with pytest.raises(SAEFormatError, match=wrong):
        load_sae(folder)
    tensors = {"W_enc": torch.zeros(16, 64), "b_enc": torch.zeros(64),
               "W_dec": torch.zeros(64, 17), "b_dec": torch.zeros(16)}
    with pytest.raises(SAEFormatError, match=r"W_dec has shape \(64, 17\) \(expected \(64, 16\)\)"):
        _build("topk", tensors, k=4, where=tmp_path)


def test_json_files_are_read_by_one_reader(tmp_path):
    from saereg.registry.catalog.sources import read_folder
    from saereg.registry.sae.folder import load_sae

    folder = make_sae_folder(tmp_path / "s")
    (folder / "cfg.json").write_text("[1, 2]")
    for read in (read_folder, load_sae):
        with pytest.raises(SAEFormatError, match="cfg.json is not a JSON object"):
            read(folder)
    (folder / "cfg.json").write_text("{not json")
    for read in (read_folder, load_sae):
        with pytest.raises(SAEFormatError, match="cannot read .*cfg.json"):
            read(folder)


# -- the dtype map ------------------------------------------------------------------------------

def test_one_dtype_map(tmp_path):
    from saereg.registry.sae.folder import load_sae
    from saereg.registry.sae.modules import DTYPES, SAEConfig, dtype_name, torch_dtype
    from saereg.training.config import LM_DTYPES

    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype(torch.float16) is torch.float16
    assert all(dtype_name(DTYPES[name]) == name for name in DTYPES)
    assert dtype_name(torch.int8) is None
    with pytest.raises(ConfigError, match="dtype must be one of float32, bfloat16, float16; "
                                          "got 'float64'") as e:
        torch_dtype("float64", LM_DTYPES)
    assert e.value.field == "dtype"
    with pytest.raises(ConfigError, match="got 'int8'"):
        SAEConfig(d_in=4, d_sae=8, architecture="relu", dtype="int8")
    folder = make_sae_folder(tmp_path / "s")
    assert load_sae(folder, dtype="bfloat16").W_enc.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="got 'half-ish'"):  # a clear error, not a KeyError
        load_sae(folder, dtype="half-ish")


# -- the migration head ---------------------------------------------------------------------------

def test_one_head_and_one_current_revision(tmp_path):
    from saereg.registry.catalog import db, migrate

    head = migrate.head_revision()
    revisions = migrate.history()
    assert [r.revision for r in revisions if r.is_head] == [head] == [revisions[-1].revision]
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    engine = db.get_engine(url, check_schema=False)
    assert migrate.current_revision(engine) is None
    db.ensure_schema(engine)  # SQLite: migrated to the head that migrate reads
    assert migrate.current_revision(engine) == head
    migrate.downgrade_engine(engine, "-1")
    assert migrate.current_revision(engine) == revisions[-2].revision
    db.ensure_schema(engine)
    assert migrate.current_revision(engine) == head
    assert [r.revision for r in migrate.history(head) if r.is_current] == [head]
    db.dispose_all()
