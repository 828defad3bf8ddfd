"""One model under several recorded names: the packaged model as its alias and as its hub id,
a Hub id in two letter cases. Every filter by model (`saereg sae list --model`, word search,
meaning search across SAEs) takes all of them, on SQLite and PostgreSQL; names that are not
Hub ids (local folders) match only as written, and globs match the names as recorded."""

from __future__ import annotations

import pytest
from catalog_helpers import make_sae_folder
from click.testing import CliRunner

from saereg.commands.main import cli
from saereg.registry.catalog import db
from saereg.registry.models import model_key, same_model

NAMES = {"alias": "smollm2-135m", "hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
         "gpt": "openai-community/gpt2", "gpt-upper": "OpenAI-Community/GPT2",
         "folder": "/data/Models/mine", "folder-lower": "/data/models/mine"}


@pytest.mark.parametrize("a, b, same", [
    ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", True),
    ("SmolLM2", "huggingfacetb/smollm2-135m-instruct", True),
    (" smollm2-135m-instruct ", "smollm2-135m", True),
    ("HuggingFaceTB/SmolLM2-135M", "smollm2-135m", False),  # the base model is another one
    ("openai-community/gpt2", "OpenAI-Community/GPT2", True),
    ("gpt2", "openai-community/gpt2", False),  # the Hub's redirect is not known offline
    ("/data/Models/mine", "/data/models/mine", False),
    ("./model.gguf", "./model.gguf", True)])
def test_which_names_name_one_model(a, b, same):
    assert same_model(a, b) is same
    assert (model_key(a) == model_key(b)) is same


@pytest.fixture
def six(catalog, tmp_path):
    for i, (key, model) in enumerate(NAMES.items()):
        catalog.register_folder(make_sae_folder(tmp_path / key, model=model, seed=i), key)
    return catalog


def names(rows) -> set[str]:
    return {r.name for r in rows}


def test_list_takes_every_name_of_the_model(six):
    assert names(six.list(model="smollm2-135m")) == {"alias", "hub"}
    assert names(six.list(model="huggingfacetb/smollm2-135m-instruct")) == {"alias", "hub"}
    assert names(six.list(model="openai-community/GPT2")) == {"gpt", "gpt-upper"}
    assert names(six.list(model="/data/models/mine")) == {"folder-lower"}
    assert names(six.list(model="HuggingFaceTB/*")) == {"hub"}  # a glob: names as recorded
    assert names(six.list(model="nobody/none")) == set()
    out = CliRunner().invoke(cli, ["sae", "list", "--model", "SmolLM2"])
    assert out.exit_code == 0, out.output
    assert "alias@1" in out.output and "hub@1" in out.output and "gpt@1" not in out.output


def test_search_by_word_and_meaning_take_every_name_of_the_model(six):
    from saereg.analysis.labels import add_label
    from saereg.analysis.search import search_labels
    from saereg.analysis.semantic import search_meaning, search_meaning_grouped

    for key in NAMES:
        add_label(f"{key}@1", 2, "wormholes and temporal paradoxes")
    found = search_labels("wormholes", model="smollm2-135m")
    assert {h.ref for h in found} == {"alias@1", "hub@1"}
    found = search_meaning("time travel", model="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert {h.ref for h in found} == {"alias@1", "hub@1"}
    groups = search_meaning_grouped("time travel", model="smollm2")
    assert {g.ref for g in groups} == {"alias@1", "hub@1"}
    assert {h.ref for h in search_labels("wormholes", model="nobody/none")} == set()
    db.dispose_all()
