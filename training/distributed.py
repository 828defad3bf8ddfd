"""Data-parallel training: the strategy, collectives between processes, and a per-process report.

With ``--strategy ddp`` Lightning runs one process per device (``devices x num_nodes`` in all)
and averages gradients. The command is started once per node; Lightning's launcher starts the
other local processes by running the same command line again, with LOCAL_RANK and friends in
their environment. Only the process of global rank 0 owns the job (folder, MLflow runs,
checkpoints, evaluation, saved SAEs); before training it puts the job folder in
``SAEREG_TRAIN_JOB`` so the processes it starts can attach to that job instead of making one.

Everything here is a no-op in a single process, so a one-device job runs exactly as before.
"""

from __future__ import annotations

import hashlib
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

JOB_ENV = "SAEREG_TRAIN_JOB"
"""Set by rank 0 to its job folder for the processes it starts."""


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective's tensor must live: the current GPU for nccl, else where it is."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def make_strategy(cfg) -> Any:
    """"auto" for one process; otherwise DDP. Buffers are sent from rank 0 when DDP wraps the
    module, not before every step: the training module keeps them equal itself (firing
    statistics and thresholds are summed or averaged over the processes each step)."""
    if cfg.strategy == "auto" and cfg.world_size == 1:
        return "auto"
    import inspect

    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return DDPStrategy(**{"forward_sync_buffers" if newer else "broadcast_buffers": False})


@torch.no_grad()
def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sums over all processes of tensors of one dtype, in one collective; the
    inputs themselves when there is a single process."""
    if world_size() == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dev = flat.device
    flat = flat.to(_comm_device(flat))
    dist.all_reduce(flat)
    flat = flat.to(dev)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


@torch.no_grad()
def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with the values of process ``src``."""
    if world_size() == 1:
        return
    for t in tensors:
        buf = t.detach().to(_comm_device(t)).contiguous()
        dist.broadcast(buf, src)
        t.detach().copy_(buf)


def all_gather_objects(value: Any) -> list[Any]:
    """``value`` (JSON-like: numbers, strings, lists, dicts) of every process, by rank."""
    if world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors (sorted names and exact bytes): equal exactly when every
    tensor is bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def exported_sha256(sae) -> str:
    """tensors_sha256 of the tensors that saving ``sae`` writes (normalisation folded)."""
    import copy

    out = copy.deepcopy(sae).to("cpu")
    out.fold_normalization()
    return tensors_sha256(out.export_state_dict())


class RankReport(L.Callback):
    """What each process did, gathered on every process when training ends: tokens it trained
    on in this session, tokens its stream harvested, the position it reached in the window (or
    shard) stream, a digest of the token ids it read, a digest of its whole final state and
    one of each SAE as it would be saved."""

    def __init__(self) -> None:
        self.tokens = 0
        self.ranks: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += int(next(iter(batch.values())).shape[0])

    def on_train_end(self, trainer, pl_module) -> None:
        stream = trainer.datamodule.stream
        sids = list(pl_module.saes)
        mine = {"tokens": self.tokens, "tokens_harvested": int(stream.tokens_harvested),
                "position": int(stream.windows_consumed), "data_sha256": stream.data_digest,
                "state_sha256": tensors_sha256(pl_module.state_dict()),
                "sae_sha256": {sid: exported_sha256(pl_module.saes[sid]) for sid in sids}}
        self.ranks = [{"rank": r, **v} for r, v in enumerate(all_gather_objects(mine))]
