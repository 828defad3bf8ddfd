"""Activations for training: one language-model pass feeds every hook, through a shuffling buffer.

The stream tokenises and packs text (:class:`saereg.training.data.TokenWindows`), runs the model body
with :class:`saereg.training.lm.ActivationCapture` (the forward stops after the deepest hook), drops
BOS / EOS / padding positions, and keeps the activations of all hooks for the same token
positions in one buffer, so every hook sees the same shuffled tokens. The buffer is filled once;
then each batch is drawn from random slots, which are refilled with fresh activations. So the
model runs for about one batch of tokens per step (steady progress, no long refill pauses), and
a token stays in the buffer for a geometric number of steps (mean capacity / batch).

In a data-parallel job every process has its own stream over its own share of the windows
(``make_windows`` shards them); ``windows_consumed`` is a position in the whole window stream,
and ``data_digest`` fingerprints the token ids this stream has read.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator

import torch

from saereg.registry.errors import DatasetError


class ActivationStream:
    """Batches of ``batch_tokens`` activations per hook: ``{hook: Tensor[batch_tokens, d]}``."""

    def __init__(self, lm, hooks: list[str], make_windows: Callable[[int], object], *,
                 lm_batch_size: int, batch_tokens: int, buffer_tokens: int, seed: int = 0,
                 skip_windows: int = 0, max_epochs: int = 100):
        from saereg.training.lm import ActivationCapture

        self.lm = lm
        self.make_windows = make_windows
        self.lm_batch_size = lm_batch_size
        self._init_buffer(hooks, batch_tokens=batch_tokens, buffer_tokens=buffer_tokens,
                          seed=seed, skip=skip_windows, max_epochs=max_epochs)
        self.capture = ActivationCapture(lm, self.hooks)

    def _init_buffer(self, hooks: list[str], *, batch_tokens: int, buffer_tokens: int, seed: int,
                     skip: int, max_epochs: int) -> None:
        """The state of the shuffling buffer and of the source's position, whatever the source
        (the model here, a cache's shards in :class:`saereg.training.cache.CacheStream`):
        ``skip`` items of the source (windows, shards) were read before."""
        self.hooks = list(hooks)
        self.batch_tokens = batch_tokens
        self.capacity = max(buffer_tokens, 2 * batch_tokens)
        self.generator = torch.Generator().manual_seed(seed)
        self.windows_consumed = skip
        self.tokens_harvested = 0
        self.epoch = 0
        self.max_epochs = max_epochs
        self.buffer: dict[str, torch.Tensor] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self._lm_iter: Iterator | None = None
        self._digest = hashlib.sha256()

    @property
    def data_digest(self) -> str:
        """sha256 of the token ids read so far (tells the streams of two processes apart)."""
        return self._digest.hexdigest()

    # -- harvesting -------------------------------------------------------------------------
    def _lm_batches(self) -> Iterator[torch.Tensor]:
        while self.epoch < self.max_epochs:
            start = self.windows_consumed
            windows = self.make_windows(start)
            n = 0
            for input_ids, _ in windows.batches(self.lm_batch_size):
                n += 1
                self.windows_consumed = windows.position
                yield input_ids
            if n == 0 and start == 0:
                raise DatasetError("the dataset yielded no complete context window; "
                                   "give more text or a smaller --context-size")
            self.epoch += 1
            self.windows_consumed = 0
            print(f"[saereg] corpus exhausted; starting pass {self.epoch + 1} over the data",
                  file=sys.stderr)
        raise DatasetError(f"the dataset ran out after {self.max_epochs} passes")

    def harvest(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations of every hook at the non-special positions of ``input_ids``."""
        from saereg.training.lm import special_token_mask

        acts = self.capture(input_ids)
        self._digest.update(input_ids.cpu().numpy().tobytes())
        keep = ~special_token_mask(self.lm.tokenizer, input_ids)
        out = {}
        for hook in self.hooks:
            a = acts[hook]
            out[hook] = a[keep.to(a.device)].float()
        self.tokens_harvested += int(keep.sum())
        return out

    def _fill(self) -> None:
        """First use: harvest until the buffer holds ``capacity`` activations, shuffled."""
        chunks: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        size = 0
        while size < self.capacity:
            new = self.harvest(next(self._lm_iter))
            for h in self.hooks:
                chunks[h].append(new[h])
            size += new[self.hooks[0]].shape[0]
        perm = torch.randperm(size, generator=self.generator)
        for h in self.hooks:
            buf = torch.cat(chunks[h])
            self.buffer[h] = buf[perm.to(buf.device)]
            self.pending[h] = buf[:0]

    def _harvest_pending(self, n: int) -> None:
        while self.pending[self.hooks[0]].shape[0] < n:
            new = self.harvest(next(self._lm_iter))
            for h in self.hooks:
                self.pending[h] = torch.cat([self.pending[h], new[h]])

    @property
    def size(self) -> int:
        return self.buffer[self.hooks[0]].shape[0] if self.buffer else 0

    # -- consuming --------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._lm_iter is None:
            self._lm_iter = self._lm_batches()
            self._fill()

    def peek(self, n: int) -> dict[str, torch.Tensor]:
        """Up to n shuffled activations per hook, without consuming them (for initialisation)."""
        self._ensure_started()
        return {h: b[:n] for h, b in self.buffer.items()}

    def next_batch(self) -> dict[str, torch.Tensor]:
        """A batch drawn at random from the buffer; the drawn slots are refilled with fresh
        activations, so each step runs the model for about one batch of tokens."""
        self._ensure_started()
        b = self.batch_tokens
        self._harvest_pending(b)
        idx = torch.randperm(self.size, generator=self.generator)[:b]
        batch = {}
        for h in self.hooks:
            buf = self.buffer[h]
            i = idx.to(buf.device)
            batch[h] = buf[i].clone()
            buf[i] = self.pending[h][:b]
            self.pending[h] = self.pending[h][b:]
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()


class StreamDataset(torch.utils.data.IterableDataset):
    """Adapter so a Lightning Trainer can iterate an ActivationStream (num_workers=0)."""

    def __init__(self, stream: ActivationStream, steps: int):
        super().__init__()
        self.stream = stream
        self.steps = steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.stream.next_batch()
