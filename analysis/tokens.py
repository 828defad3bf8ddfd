"""How a token is shown to people: one rule for the terminal dashboard, the PNG plot, the LLM
explainer's prompt and the heuristic labels.

Tokenizers store a token's leading space and its control characters as stand-ins: byte-level
BPE (GPT-2, LLaMA 3, SmolLM2) writes a space as ``Ġ`` (U+0120), a newline as ``Ċ`` (U+010A), a
tab as ``ĉ`` (U+0109) and a carriage return as ``č`` (U+010D); SentencePiece writes a space as
``▁`` (U+2581). The display form puts the space back and writes the control characters as
visible escapes (``\\n``, ``\\t``, ``\\r``), so a token stays on one line.
"""

from __future__ import annotations

_DISPLAY = str.maketrans({"\u0120": " ", "\u2581": " ", "\u010a": "\\n", "\u0109": "\\t",
                          "\u010d": "\\r", "\n": "\\n", "\t": "\\t", "\r": "\\r"})


def display_token(token: str) -> str:
    """The display form of a token string as the tokenizer stores it."""
    return token.translate(_DISPLAY)
