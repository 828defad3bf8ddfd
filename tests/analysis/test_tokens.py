"""One display form of a token (``saereg.analysis.tokens.display_token``): byte-level BPE and
SentencePiece space markers become spaces, newlines and tabs (stored or as their byte-level
stand-ins) become visible escapes, a byte-level token's other bytes read back as UTF-8 text
(``Ã©`` is ``é``; part of a character shows as ``\\x`` escapes), SentencePiece's own characters
stay; the terminal dashboard, the LLM explainer's prompt and the heuristic labels all show
tokens that way."""

from __future__ import annotations

import click

from saereg.analysis.explainer import explain_prompt_text
from saereg.analysis.labels import heuristic_text
from saereg.commands.feature_views import example_line
from saereg.analysis.tokens import display_token


def test_display_token():
    assert display_token("\u0120travel") == " travel"      # GPT-2 / LLaMA 3 byte-level space
    assert display_token("\u2581travel") == " travel"      # SentencePiece space
    assert display_token("\u010a\u010a") == "\\n\\n"       # byte-level newline
    assert display_token("\u0109x\u010d") == "\\tx\\r"     # byte-level tab, carriage return
    assert display_token("a\nb\tc") == "a\\nb\\tc"         # raw control characters
    assert display_token("a\x06b\x1b[31m\x85") == "a\\x06b\\x1b[31m\\x85"  # no terminal escapes
    assert display_token("plain") == "plain"
    assert display_token("") == ""


def test_byte_level_tokens_read_back_as_their_text():
    assert display_token("\u0120caf\u00c3\u00a9") == " café"        # Ġcafé, é = C3 A9
    assert display_token("\u00e6\u0139\u00a5\u00e6\u013e\u00ac") == "日本"  # E6 97 A5 E6 9C AC
    assert display_token("\u0120\u00e2\u0122\u0136") == " \u2014"  # an em dash, E2 80 94
    assert display_token("\u00e2\u0122") == "\\xe2\\x80"           # its first two bytes alone
    assert display_token("\u00e9t\u00e9") == "été"   # SentencePiece keeps é: not bytes C3 A9
    assert display_token("\u2581\u00e9t\u00e9") == " été"
    assert display_token("<0xE2>") == "<0xE2>"        # SentencePiece's byte token, as stored
    assert display_token("\u0120\u65e5") == "\u0120\u65e5"  # not in the byte alphabet: as is


def test_every_view_shows_tokens_in_the_display_form():
    ex = {"tokens": ["\u0120by", "\u0120train", "\u010a"], "acts": [0.0, 2.0, 0.0], "peak": 1,
          "activation": 2.0}
    logits = [["\u0120railway", 1.5], ["\u2581rail", 1.0]]
    assert click.unstyle(example_line(ex)) == " by[ train]\\n"
    prompt = explain_prompt_text([ex], logits)
    assert "1.  by<< train>>\\n" in prompt and "' railway', ' rail'" in prompt
    assert "\u0120" not in prompt and "\u2581" not in prompt
    assert heuristic_text([ex], logits) == "fires on 'train'; promotes 'railway', 'rail'"
    ex = {**ex, "tokens": ["\u0120caf\u00c3\u00a9", "\u0120cr\u00c3\u00a8me", "\u010a"]}
    assert heuristic_text([ex], [["\u0120br\u00c3\u00bbl\u00c3\u00a9e", 1.0]]) == \
        "fires on 'crème'; promotes 'brûlée'"
