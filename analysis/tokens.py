"""How a token is shown to people: one rule for the terminal dashboard, the PNG plot, the LLM
explainer's prompt, the heuristic labels and the web app.

Tokenizers store a token's bytes as stand-ins. Byte-level BPE (GPT-2, LLaMA 3, SmolLM2) maps
each of the 256 byte values to one printable character: printable ASCII and most of Latin-1 to
themselves, the rest (space, control bytes, 0x7F-0xA0, 0xAD) to U+0100-U+0143, so a space is
``Ġ`` (U+0120), a newline ``Ċ`` (U+010A), and ``é`` (UTF-8 C3 A9) is stored as ``Ã©``.
SentencePiece writes a space as ``▁`` (U+2581) and keeps other characters as they are. The
display form reads a byte-level token back as the UTF-8 text of its bytes (a token that holds
part of a character shows the bytes it has as ``\\xe2\\x80``), puts SentencePiece's space
back, and writes control characters as visible escapes (``\\n``, ``\\t``, ``\\r``, the others as
``\\x1b``), so a token stays on one line and cannot steer a terminal.
"""

from __future__ import annotations


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte value, reversed (character -> byte)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: b for b in kept}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 0x100 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


_BYTE_OF = _byte_alphabet()
_STAND_INS = {c for c, b in _BYTE_OF.items() if ord(c) >= 0x100}  # U+0100-U+0143
_ESCAPES = str.maketrans({**{chr(c): f"\\x{c:02x}" for c in (*range(32), *range(127, 160))},
                          "\u2581": " ", "\n": "\\n", "\t": "\\t", "\r": "\\r"})


def _from_bytes(token: str) -> str | None:
    """The text of a byte-level BPE token, or None when ``token`` is not one (a character
    outside the byte alphabet; or only characters that stand for themselves, whose bytes do
    not decode: a SentencePiece token such as ``é``)."""
    if not token or token.isascii() or any(c not in _BYTE_OF for c in token):
        return None
    raw = bytes(_BYTE_OF[c] for c in token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if not any(c in _STAND_INS for c in token):
            return None
        return raw.decode("utf-8", errors="backslashreplace")


def display_token(token: str) -> str:
    """The display form of a token string as the tokenizer stores it."""
    text = _from_bytes(token)
    if text is None:
        text = token
    return text.translate(_ESCAPES)
