"""The configuration of one activation cache to write (``saereg cache``)."""

from __future__ import annotations

from dataclasses import dataclass

from saereg.registry.errors import ConfigError
from saereg.training.config import LM_DTYPES
from saereg.training.fields import not_negative, one_of, positive


@dataclass
class CacheConfig:
    """One activation cache to write: the model's activations at ``hooks``, stored once so
    that training reads them instead of running the model (see saereg.training.cache)."""

    model: str
    """Model reference: a packaged alias, a local folder, a .gguf file or a hub id."""
    hooks: list[str]
    """Hook points: module paths of the model, or decoder layer numbers."""
    out: str
    """Cache folder (created; an incomplete cache there is resumed)."""
    tokens: int
    """Activations to store per hook."""
    dataset: str | None = None
    """Hub dataset name or local text/jsonl/parquet path (unset: the offline default corpus)."""
    text_column: str | None = None
    """Column holding the text (unset: text, or the first string column)."""
    context_size: int = 128
    """Tokens per context window (BOS first)."""
    lm_batch_size: int = 8
    """Context windows per language-model forward pass."""
    shard_tokens: int = 65536
    """Activations per shard file."""
    heldout_tokens: int = 8192
    """Held-out activations stored for evaluation without the model."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: str = "float32"
    """Language-model dtype: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        self.hooks = [str(h) for h in ([self.hooks] if isinstance(self.hooks, str) else self.hooks)]
        if not self.hooks:
            raise ConfigError("hooks is empty: at least one hook point is needed", field="hooks")
        positive(self, "tokens", "context_size", "lm_batch_size", "shard_tokens")
        not_negative(self, "heldout_tokens")
        if self.context_size < 2:
            raise ConfigError(f"context_size must be at least 2 (BOS plus one token); got "
                              f"{self.context_size}", field="context_size")
        one_of(self, "dtype", LM_DTYPES)
