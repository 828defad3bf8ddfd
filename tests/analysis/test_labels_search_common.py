"""Word search when a word is in most labels, on SQLite (FTS5) and PostgreSQL (full text), with
the common-word threshold (``RANKED_DF``) set low so that a small catalog has common words:
a query of a common and a rare word returns exactly the labels holding both, ranked by the
rare word (more occurrences first, rank > 0); a query of common words only lists every
matching feature once, newest label first (rank 0), honours ``limit``, skips rejected labels,
shows the current label and names the older one that matched; the SAE, hook and firing-rate
filters give the same features as filtering the full answer, also when two SAEs' labels are
written interleaved (the label-id ranges of the picked versions overlap); two common words
seldom in one label ("forest fires") give exactly the features with a label holding both,
newest first, with and without filters, whichever way PostgreSQL reads them (newest first,
through the full-text index, or newest first and then through the index)."""

from __future__ import annotations

import pytest

from saereg.analysis import labels, search
from saereg.analysis.search import search_labels
from saereg.analysis.stats import AnalyzeConfig, analyze, feature_stats
from feature_helpers import register_tiny_sae


def heuristic(i: int) -> str:
    return f"fires on 'tok{i}', 'x{i % 7}'; promotes 'y{i % 5}', 'z{i}'"


@pytest.fixture
def common(monkeypatch):
    monkeypatch.setattr(search, "RANKED_DF", 6)


def test_common_and_rare_word_ranks_by_the_rare_word(tiny_sae, common):
    labels.add_labels(tiny_sae, [(i, heuristic(i)) for i in range(30)],
                      method="heuristic", model="bench-heuristic")
    labels.add_label(tiny_sae, 40, "fires on 'wormhole', 'a', 'b', 'c'; promotes 'd', 'e'")
    labels.add_label(tiny_sae, 41, "fires near a wormhole, wormhole, wormhole")
    labels.add_label(tiny_sae, 42, "wormhole")  # the rare word without the common one
    labels.add_label(tiny_sae, 43, "fires wormhole", status="rejected")

    hits = search_labels("fires wormhole")
    assert [h.feature_index for h in hits] == [41, 40]  # three occurrences rank first
    assert all(h.rank > 0 for h in hits)
    assert [h.feature_index for h in search_labels("wormhole fires", limit=1)] == [41]
    assert sorted(h.feature_index for h in search_labels("wormhole")) == [40, 41, 42]
    assert search_labels("fires wormhole nosuchword") == []


def test_common_words_only_every_feature_once_newest_first(tiny_sae, common):
    labels.add_labels(tiny_sae, [(i, heuristic(i)) for i in range(30)],
                      method="heuristic", model="bench-heuristic")
    labels.add_label(tiny_sae, 3, "railway timetables")  # current label; the old one matched
    labels.add_label(tiny_sae, 4, "fires on rejected", status="rejected")
    labels.add_label(tiny_sae, 50, "fires on rejected", status="rejected")  # nothing else
    labels.add_label(tiny_sae, 60, "forest fires", status="accepted")  # newest match

    hits = search_labels("fires", limit=1000)
    assert [h.feature_index for h in hits] == [60, *range(29, -1, -1)]
    assert {h.rank for h in hits} == {0.0}
    by_index = {h.feature_index: h for h in hits}
    assert (by_index[3].label, by_index[3].matched) == ("railway timetables", heuristic(3))
    assert (by_index[4].label, by_index[4].matched) == (heuristic(4), None)
    assert [h.feature_index for h in search_labels("fires", limit=5)] == [60, 29, 28, 27, 26]
    assert [h.feature_index for h in search_labels("promotes fires", limit=3)] == [29, 28, 27]
    assert search_labels("rejected") == []


def test_filters_with_a_common_word(tiny_sae, tiny_model_dir, tmp_path, common):
    other = register_tiny_sae(tiny_model_dir, tmp_path, "other-sae", seed=1,
                              hook="model.layers.0")
    for lo in range(0, 40, 10):  # the two SAEs' labels interleaved in id order
        labels.add_labels(tiny_sae, [(i, heuristic(i)) for i in range(lo, lo + 10)])
        labels.add_labels(other, [(i, heuristic(i)) for i in range(lo, lo + 5)])
    mine, theirs = tiny_sae.split("@")[0], other.split("@")[0]

    for kw, ref, expected in (({"sae": mine}, tiny_sae, range(40)),
                              ({"sae": theirs}, other, [i for i in range(40) if i % 10 < 5]),
                              ({"hook": "model.layers.0"}, other,
                               [i for i in range(40) if i % 10 < 5])):
        hits = search_labels("fires", limit=1000, **kw)
        assert {h.ref for h in hits} == {ref}
        assert [h.feature_index for h in hits] == sorted(expected, reverse=True)
        assert [h.feature_index for h in search_labels("fires", limit=4, **kw)] == \
            sorted(expected, reverse=True)[:4]
    assert search_labels("fires", sae="no-such-sae") == []

    analyze(tiny_sae, AnalyzeConfig(tokens=512, context_size=32), progress=False)
    rates = {i: feature_stats(tiny_sae, i)[2].firing_rate for i in range(40)}
    lo = sorted(rates.values())[len(rates) // 2]
    hits = search_labels("fires", min_rate=lo, limit=1000)
    assert [h.feature_index for h in hits] == sorted((i for i, r in rates.items() if r >= lo),
                                                     reverse=True)
    assert all(h.ref == tiny_sae and h.firing_rate >= lo for h in hits)
    first = search_labels("fires", sae=mine, min_rate=lo, limit=3)
    assert [h.feature_index for h in first] == [h.feature_index for h in hits[:3]]


def test_two_common_words_list_the_labels_holding_both(tiny_sae, tiny_model_dir, tmp_path,
                                                        common, monkeypatch):
    """"forest" and "fires" both common, seldom in one label: the features whose labels hold
    both, newest matching label first, whichever way PostgreSQL reads them (newest first, by
    the full-text index, or newest first and then by the index)."""
    other = register_tiny_sae(tiny_model_dir, tmp_path, "other-sae", seed=1)
    labels.add_labels(tiny_sae, [(i, heuristic(i)) for i in range(20)])
    labels.add_label(tiny_sae, 20, "forest fires", status="accepted")
    labels.add_label(other, 0, "forest fires")
    labels.add_label(tiny_sae, 21, "forest trails and camp")
    labels.add_label(tiny_sae, 22, "forest fires", status="rejected")
    labels.add_label(tiny_sae, 23, "smoke over the forest; fires")
    labels.add_label(other, 1, "fires near the forest")
    labels.add_label(tiny_sae, 24, "forest fires")
    labels.add_labels(tiny_sae, [(25, "forest"), (26, "dense forest")])
    labels.add_label(tiny_sae, 3, "forest fires")  # also a heuristic label, older
    labels.add_label(tiny_sae, 24, "railway timetables", status="accepted")
    labels.add_labels(tiny_sae, [(27, f"fires in the forest, take {k}") for k in range(14)])
    labels.add_label(other, 2, "forest fires", status="rejected")
    labels.add_labels(tiny_sae, [(i, heuristic(i)) for i in range(40, 70)])  # newest, no forest
    mine = tiny_sae.split("@")[0]
    expected = [(tiny_sae, 27), (tiny_sae, 3), (tiny_sae, 24), (other, 1), (tiny_sae, 23),
                (other, 0), (tiny_sae, 20)]
    analyze(tiny_sae, AnalyzeConfig(tokens=512, context_size=32), progress=False)
    rates = {i: feature_stats(tiny_sae, i)[2].firing_rate for i in (3, 20, 23, 24, 27)}
    lo = sorted(rates.values())[2]
    rated = [(r, i) for r, i in expected if r == tiny_sae and rates[i] >= lo]
    assert 0 < len(rated) < 5

    for plan in (None, lambda *a: False, lambda *a: True, lambda read, *a: read > 0):
        if plan is not None:  # the PostgreSQL read: newest first, by the index, switching
            monkeypatch.setattr(search, "_use_index", plan)
        for limit in (1, 2, 4, 1000):
            for q in ("forest fires", "fires forest"):
                hits = search_labels(q, limit=limit)
                assert [(h.ref, h.feature_index) for h in hits] == expected[:limit]
        hits = search_labels("forest fires")
        assert {h.rank for h in hits} == {0.0}
        by = {(h.ref, h.feature_index): h for h in hits}
        assert (by[tiny_sae, 24].label, by[tiny_sae, 24].matched) == ("railway timetables",
                                                                        "forest fires")
        assert (by[tiny_sae, 27].label, by[tiny_sae, 27].matched) == (
            "fires in the forest, take 13", None)
        assert (by[tiny_sae, 3].label, by[tiny_sae, 3].matched) == ("forest fires", None)
        assert [h.feature_index for h in search_labels("forest fires", sae=mine, limit=3)] == \
            [27, 3, 24]
        assert [(h.ref, h.feature_index) for h in search_labels(
            "forest fires", hook="model.layers.1", limit=1000)] == expected
        hits = search_labels("forest fires", min_rate=lo, limit=1000)
        assert [(h.ref, h.feature_index) for h in hits] == rated
        assert all(h.firing_rate >= lo for h in hits)
        assert search_labels("forest fires", max_rate=0.0) == []
        assert search_labels("forest fires", sae=mine, max_rate=0.0) == []
        assert search_labels("forest fires nosuchword") == []
