"""Labels and search on SQLite (FTS5) and PostgreSQL (full text): relabelling appends and keeps
every version with its provenance (supersedes, method, model, author, status); search finds a
labelled feature by one word of its label (stemmed), ranks and filters (SAE, firing rate),
skips rejected labels, and shows each hit under its current label (the one `feature show`
shows) even when an older label matched; the heuristic labeller labels every live feature
from stored stats;
`saereg feature show` renders the dashboard and `feature plot` writes a PNG; bad input (index out of range, empty text) is one
clear error with nothing stored; `saereg --help` still imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from saereg.analysis import labels
from saereg.analysis.search import search_labels
from saereg.analysis.stats import AnalyzeConfig, analyze
from saereg.commands.main import cli
from saereg.registry.catalog import db
from saereg.registry.catalog.feature_schema import FeatureLabel
from saereg.registry.errors import UsageError


def n_labels() -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(FeatureLabel))


def test_history_and_search(tiny_sae, monkeypatch):
    monkeypatch.setenv("SAEREG_USER", "alice")
    first = labels.add_label(tiny_sae, 7, "Mentions of travelling by train")
    labels.add_label(tiny_sae, 9, "closing parentheses in code")
    second = labels.add_label(tiny_sae, 7, "travel and journeys", status="accepted")
    hist = labels.history(tiny_sae, 7)
    assert [h.text for h in hist] == ["Mentions of travelling by train", "travel and journeys"]
    assert second.supersedes == first.id and first.supersedes is None
    assert {h.author for h in hist} == {"alice"} and {h.method for h in hist} == {"human"}
    assert labels.current(hist).text == "travel and journeys"

    hits = search_labels("travel")  # stemmed: matches both labels of feature 7, listed once
    assert [(h.ref, h.feature_index) for h in hits] == [(tiny_sae, 7)]
    assert search_labels("parentheses")[0].feature_index == 9
    assert search_labels("travel parentheses") == []
    assert search_labels("travel", sae="other-sae") == []
    labels.set_status(second.id, "rejected")
    assert search_labels("journeys") == []
    assert [h.label for h in search_labels("train")] == ["Mentions of travelling by train"]

    before = n_labels()
    with pytest.raises(UsageError, match="out of range"):
        labels.add_label(tiny_sae, 96, "nope")
    with pytest.raises(UsageError, match="needs some text"):
        labels.add_labels(tiny_sae, [(1, "fine"), (2, "   ")])
    with pytest.raises(UsageError):
        search_labels("  ")
    assert n_labels() == before


def test_a_hit_shows_the_current_label_even_when_an_older_one_matched(tiny_sae):
    old = labels.add_label(tiny_sae, 5, "Mentions of travelling by train")
    new = labels.add_label(tiny_sae, 5, "railway timetables")
    assert new.supersedes == old.id
    labels.add_label(tiny_sae, 6, "steam trains", status="accepted")
    labels.add_label(tiny_sae, 6, "trains and buses")  # a newer candidate: not current
    assert labels.current(labels.history(tiny_sae, 5)).text == "railway timetables"

    hits = {h.feature_index: h for h in search_labels("travelling")}
    assert set(hits) == {5}
    assert (hits[5].label, hits[5].status, hits[5].method) == ("railway timetables",
                                                               "candidate", "human")
    assert hits[5].matched == "Mentions of travelling by train"
    [hit] = search_labels("timetables")  # the current label itself matched
    assert (hit.label, hit.matched) == ("railway timetables", None)
    hits = {h.feature_index: h for h in search_labels("buses")}
    assert (hits[6].label, hits[6].matched) == ("steam trains", "trains and buses")
    r = CliRunner().invoke(cli, ["search", "travelling"])
    assert r.exit_code == 0, r.output
    [line] = r.output.splitlines()  # the current label is the hit's label; the match is named
    assert line.split("\t")[4:] == ["railway timetables",
                                     "(matched an older label: Mentions of travelling by train)"]
    r = CliRunner().invoke(cli, ["search", "timetables"])
    assert r.exit_code == 0 and r.output.rstrip().endswith("\trailway timetables"), r.output
    r = CliRunner().invoke(cli, ["feature", "show", tiny_sae, "5"])
    assert r.exit_code == 0 and "current label: railway timetables" in r.output, r.output


def test_heuristic_labels_every_live_feature_and_cli(tiny_sae, tmp_path):
    analyze(tiny_sae, AnalyzeConfig(tokens=512, context_size=32), progress=False)
    from saereg.analysis.stats import feature_stats

    made = labels.label_heuristic(tiny_sae)
    live = [i for i in range(96) if feature_stats(tiny_sae, i)[2].flag != "dead"]
    assert sorted(lab.feature_index for lab in made) == live and len(live) > 10
    assert {lab.method for lab in made} == {"heuristic"} and made[0].model
    rates = {i: feature_stats(tiny_sae, i)[2].firing_rate for i in live}
    lo = sorted(rates.values())[len(rates) // 2]
    hits = search_labels("fires", min_rate=lo, limit=1000)
    assert hits and all(h.firing_rate >= lo for h in hits)
    assert {h.feature_index for h in hits} == {i for i, r in rates.items() if r >= lo}

    runner = CliRunner()
    f = live[0]
    r = runner.invoke(cli, ["label", tiny_sae, str(f), "a human label"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["feature", "show", tiny_sae, str(f)])
    assert r.exit_code == 0, r.output
    assert "a human label" in r.output and "firing rate" in r.output and "top logits" in r.output
    assert "#" in r.output and "top examples" in r.output
    png = tmp_path / "f.png"
    r = runner.invoke(cli, ["feature", "plot", tiny_sae, str(f), "--out", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    r = runner.invoke(cli, ["search", "human"])
    assert r.exit_code == 0 and f"{tiny_sae}\t{f}\t" in r.output
    before = n_labels()
    r = runner.invoke(cli, ["label", tiny_sae, "1000", "x"])
    assert r.exit_code == 2 and "out of range" in r.output
    r = runner.invoke(cli, ["feature", "show", tiny_sae, "--", "-1"])
    assert r.exit_code == 2 and "out of range" in r.output
    assert n_labels() == before


def test_help_imports_no_torch():
    code = ("import sys; from click.testing import CliRunner; from saereg.commands.main import cli; "
            "r = CliRunner().invoke(cli, ['--help']); assert 'explain-prompt' in r.output; "
            "assert 'steer' in r.output; "
            "bad = [m for m in ('torch', 'transformers', 'mlflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_current_label_rule():
    """The newest accepted label, else the newest candidate; rejected ones never."""
    from saereg.registry.catalog.feature_schema import current_label

    def pick(statuses):
        found = current_label(list(enumerate(statuses)), lambda lab: lab[1])
        return None if found is None else found[0]

    assert pick(["candidate", "accepted", "candidate"]) == 1
    assert pick(["accepted", "rejected", "accepted", "candidate"]) == 2
    assert pick(["candidate", "candidate", "rejected"]) == 1
    assert pick(["rejected"]) is None and pick([]) is None
