"""The repo's model card as read back on the next push, where anyone with write access may
have edited it: the index in its HTML comment is checked, not trusted (entries of the wrong
shape or path left out, fields keeping only values of their type), and what the card shows is
one table cell per value (pipes escaped, no HTML, one line), with no value able to close the
comment that holds the index. A push onto a repo whose card was made hostile completes, and
its own row is right."""

from __future__ import annotations

import json

from test_hub import home, hub  # noqa: F401 - the hub server and catalog fixtures

from saereg.registry.hub.card import read_index, render_card

HOSTILE = {
    "good": {"name": "good", "version": 2, "tag": "good-v2", "model": "org/m", "hook": "h",
             "architecture": "topk", "d_sae": 64, "l0": 4.5, "explained_variance": 0.9},
    "bad-types": {"name": ["x"], "version": "2", "d_sae": True, "l0": "abc",
                  "explained_variance": float("inf"), "model": "a\nb"},
    "../escape": {"name": "e"},
    "not-an-object": "oops",
    "inject": {"name": "x | y <script>alert(1)</script>", "hook": "h --> <b>"},
}


def card_with(index) -> str:
    return f"# edited by hand\n<!-- saereg-index\n{json.dumps(index)}\n-->\nmore text\n"


def test_the_index_of_an_edited_card_is_checked():
    index = read_index(card_with(HOSTILE))
    assert set(index) == {"good", "bad-types", "inject"}
    assert index["good"] == HOSTILE["good"]
    assert index["bad-types"] == {"name": None, "tag": None, "model": None, "hook": None,
                                  "architecture": None, "version": None, "d_sae": None,
                                  "l0": None, "explained_variance": None}
    assert read_index(card_with(["a", "list"])) == {}
    assert read_index("<!-- saereg-index\n{not json\n-->") == {}
    assert read_index("<!-- saereg-index\n" + "[" * 100_000 + "\n-->") == {}  # too deep


def test_the_card_shows_each_value_in_one_cell_and_keeps_its_index_comment_whole():
    index = read_index(card_with(HOSTILE))
    card = render_card("acme/r", index)
    row = next(line for line in card.splitlines() if line.startswith("| inject |"))
    assert "x \\| y &lt;script&gt;alert(1)&lt;/script&gt;" in row
    assert "h --&gt; &lt;b&gt;" in row and "<" not in row
    assert row.count(" | ") == 9  # 10 cells: none split by a value's pipe
    assert "| None |" not in row and "| - | - | - |" in row  # a missing value shows as -
    # only the index comment's own end and the end marker: no value closed the comment
    assert card.count("-->") == 2 and "<script>" not in card
    assert read_index(card) == index  # the escaped index reads back the same


def test_push_onto_a_repo_with_a_hostile_card(hub, home):
    from saereg.registry.hub.sync import push

    hub.state.put_files("acme/tiny-saes", {"README.md": card_with(HOSTILE).encode()})
    pub = push("tiny@1", "acme/tiny-saes")
    card = hub.files("acme/tiny-saes", pub.commit)["README.md"].decode()
    index = read_index(card)
    assert set(index) == {"good", "bad-types", "inject", "tiny"}
    assert index["tiny"]["name"] == "tiny" and index["tiny"]["tag"] == "tiny-v1"
    assert "<script>" not in card and card.count("-->") == 2
