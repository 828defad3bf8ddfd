"""Checkpoints saved with an earlier layout of the optimizer's groups, brought to the current one."""

from __future__ import annotations

import sys
from typing import Any

from saereg.registry.errors import ConfigError
from saereg.training.distributed import rank


def regroup_optimizer(module, checkpoint: dict[str, Any]) -> None:
    """Rewrite ``checkpoint``'s Adam state and LR schedule (the dict Lightning loaded) into
    the groups of ``module.param_groups()`` when they were saved in other groups (one per
    SAE and one per JumpReLU threshold, before the encoder biases had theirs): every
    parameter keeps its own moments and step count; a group's rate is its current one at the
    schedule's factor."""
    optimizers = checkpoint.get("optimizer_states") or []
    if len(optimizers) != 1:
        return
    saved = optimizers[0]
    groups = module.param_groups()
    if [g.get("name") for g in saved["param_groups"]] == [g[0] for g in groups]:
        return
    where: dict[tuple[str, str], tuple[Any, dict]] = {}  # (SAE, parameter) -> state, group
    for group in saved["param_groups"]:
        sid, _, part = str(group.get("name")).partition("/")
        if sid not in module.saes or part not in ("", "threshold"):
            raise ConfigError(f"the checkpoint's optimizer group {group.get('name')!r} "
                              f"belongs to no SAE of this job")
        held = (["threshold"] if part else
                [n for n, _ in module.saes[sid].named_parameters() if n != "threshold"])
        if len(held) != len(group["params"]):
            raise ConfigError(f"the checkpoint's optimizer group {group['name']!r} holds "
                              f"{len(group['params'])} parameters where this version's "
                              f"SAE has {len(held)}")
        for name, index in zip(held, group["params"]):
            where[(sid, name)] = (saved["state"].get(index), group)
    missing = [f"{sid} {p}" for _, sid, params, _ in groups for p in params
               if (sid, p) not in where]
    if missing:
        raise ConfigError(f"the checkpoint has no optimizer group for {missing[0]}")
    state, new_groups = {}, []
    for name, sid, params, lr in groups:
        template = where[(sid, params[0])][1]
        factor = template["lr"] / template.get("initial_lr", template["lr"])
        start = sum(len(g["params"]) for g in new_groups)
        new_groups.append({**{k: v for k, v in template.items() if k != "params"},
                           "name": name, "initial_lr": lr, "lr": lr * factor,
                           "params": list(range(start, start + len(params)))})
        for index, param in enumerate(params, start):
            if where[(sid, param)][0] is not None:
                state[index] = where[(sid, param)][0]
    optimizers[0] = {"state": state, "param_groups": new_groups}
    for sched in checkpoint.get("lr_schedulers") or []:
        sched["base_lrs"] = [g["initial_lr"] for g in new_groups]
        sched["_last_lr"] = [g["lr"] for g in new_groups]
        if "lr_lambdas" in sched:
            sched["lr_lambdas"] = [None] * len(new_groups)
    if rank() == 0:
        print("[saereg] checkpoint from an earlier optimizer layout: the encoder biases of "
              "relu, jumprelu and gated SAEs learn at their own rate (bias_lr) from here on",
              file=sys.stderr)
