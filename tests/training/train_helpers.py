"""Helpers for training tests that run `saereg train` in a real process."""

from __future__ import annotations

import time
from pathlib import Path

from saereg.registry.paths import runs_dir


def first_checkpoint(proc, timeout: float = 240) -> Path | None:
    """Wait until a job of ``proc`` (a running Popen) has written ``checkpoints/last.ckpt``;
    None when the process ends or ``timeout`` passes first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = list(runs_dir().glob("*/checkpoints/last.ckpt")) if runs_dir().exists() else []
        if found:
            time.sleep(0.5)  # let the checkpoint be written completely
            return found[0]
        time.sleep(0.2)
    return None
