"""Live progress for training: tokens, tokens/s, loss, L0, explained variance, ETA.

On a terminal a rich progress bar; elsewhere (CI, logs) one plain line every few seconds.
"""

from __future__ import annotations

import sys
import time

import lightning as L


def _fmt_tokens(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressCallback(L.Callback):
    def __init__(self, total_tokens: int, batch_tokens: int, *, every_s: float = 5.0,
                 stream=None, rich: bool | None = None):
        self.total = total_tokens
        self.batch_tokens = batch_tokens
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.rich = self.stream.isatty() if rich is None else rich
        self._last_print = 0.0
        self._last: dict[str, float] = {}
        self._progress = None
        self._task = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._tokens0 = int(pl_module.tokens_seen)
        if self.rich:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("[bold]training[/]"), BarColumn(),
                TextColumn("{task.fields[tokens]} tok  {task.fields[rate]} tok/s  "
                           "loss {task.fields[loss]}  L0 {task.fields[l0]}  "
                           "EV {task.fields[ev]}  ETA {task.fields[eta]}"),
                console=Console(file=self.stream), transient=False, refresh_per_second=4)
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total,
                                                 completed=self._tokens0, **self._fields(0))

    def _fields(self, tokens: int) -> dict[str, str]:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        rate = (tokens - self._tokens0) / elapsed
        eta = (self.total - tokens) / rate if rate > 0 else float("nan")
        last = self._last
        return {
            "tokens": f"{_fmt_tokens(tokens)}/{_fmt_tokens(self.total)}",
            "rate": f"{rate:,.0f}",
            "loss": f"{last['loss']:.4g}" if "loss" in last else "-",
            "l0": f"{last['l0']:.1f}" if "l0" in last else "-",
            "ev": f"{last['ev']:.3f}" if "ev" in last else "-",
            "eta": _fmt_eta(eta) if eta == eta else "--:--",
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = pl_module.step_metrics
        if metrics:
            vals = list(metrics.values())
            self._last = {
                "loss": sum(m["loss/total"] for m in vals) / len(vals),
                "l0": sum(m["l0"] for m in vals) / len(vals),
                "ev": sum(m["explained_variance"] for m in vals) / len(vals),
            }
        tokens = int(pl_module.tokens_seen)
        if self._progress is not None:
            self._progress.update(self._task, completed=tokens, **self._fields(tokens))
            return
        now = time.perf_counter()
        if now - self._last_print >= self.every_s or tokens >= self.total:
            self._last_print = now
            f = self._fields(tokens)
            print(f"[train] {f['tokens']} tokens  {f['rate']} tok/s  loss {f['loss']}  "
                  f"L0 {f['l0']}  EV {f['ev']}  ETA {f['eta']}", file=self.stream, flush=True)

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop()
