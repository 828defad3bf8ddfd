"""Architecture names, in one place (no torch: the config classes and the CLI read them).

``ARCHITECTURES`` are the names this project trains and records; ``K_ARCHITECTURES`` those of
them that take ``k`` (active latents per token). ``ARCHITECTURE_ALIASES`` maps every
architecture name a ``cfg.json`` may carry, SAELens's as well as ours, to our name: SAELens
calls the plain ReLU SAE ``standard``.
"""

from __future__ import annotations

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")
K_ARCHITECTURES = ("topk", "batchtopk", "matryoshka")
ARCHITECTURE_ALIASES = {"standard": "relu", **{name: name for name in ARCHITECTURES}}
