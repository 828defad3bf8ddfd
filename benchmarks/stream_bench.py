"""Training throughput from one pass: (b) 4 hooks vs 1 hook, (c) a cache vs the model,
(d) peak memory for 1M vs 10M training tokens. Each prints ratios measured in one run.

    python benchmarks/stream_bench.py hooks --model smollm2-135m --hooks 3,6,9,12 --batches 4
    python benchmarks/stream_bench.py cache --model smollm2-135m --hook 12 --batches 4
    python benchmarks/stream_bench.py memory --tokens 1M,10M      # tiny model, fresh processes

(b) and (c) alternate the contenders batch by batch (A B A B ...); a "step" is producing one
training batch of activations and one sparse TopK step (k 32, 8x) per hook. (d) trains one
TopK SAE from an activation cache in a fresh process per budget and reads its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _stream(lm, hooks, batch, buffer, seed=0):
    from saereg.training.activations import ActivationStream
    from saereg.training.data import TokenWindows

    return ActivationStream(lm, hooks, lambda skip: TokenWindows(lm.tokenizer, 128,
                                                                 skip_windows=skip),
                            lm_batch_size=8, batch_tokens=batch, buffer_tokens=buffer, seed=seed)


def _steppers(hooks, d_in):
    from saereg.registry.sae.modules import SAEConfig, build_sae
    from saereg.training.losses import LossSettings, compute_loss

    saes = {h: build_sae(SAEConfig(d_in=d_in, d_sae=8 * d_in, architecture="topk", k=32), seed=0)
            for h in hooks}
    opts = {h: torch.optim.Adam(s.parameters(), lr=1e-4, fused=True) for h, s in saes.items()}
    dead = torch.zeros(8 * d_in, dtype=torch.bool)

    def step(batch):
        for h, sae in saes.items():
            compute_loss(sae, batch[h], LossSettings(), dead).loss.backward()
            opts[h].step()
            opts[h].zero_grad(set_to_none=True)
    return step


def timed(contenders: dict, n: int) -> dict[str, float]:
    times = {k: [] for k in contenders}
    for fn in contenders.values():  # warm-up (fills the buffers)
        fn()
    for _ in range(n):
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_hooks(args) -> None:
    """Harvest (the model pass up to the deepest hook, captures, buffer) and the whole step
    (harvest + one TopK step per hook), 4 hooks vs the deepest one alone, alternating."""
    from saereg.training.lm import hook_dim, load_lm, resolve_hooks

    lm = load_lm(args.model)
    many = resolve_hooks(lm, args.hooks.split(","))
    one = [many[-1]]
    d = hook_dim(lm, one[0])
    streams = {"many": _stream(lm, many, args.batch, args.batch * 2),
               "one": _stream(lm, one, args.batch, args.batch * 2)}
    steppers = {"many": _steppers(many, d), "one": _steppers(one, d)}
    harvest: dict[str, list[float]] = {"many": [], "one": []}
    total: dict[str, list[float]] = {"many": [], "one": []}
    for i in range(args.batches + 1):  # the first round is a warm-up (fills the buffers)
        for name in ("many", "one"):
            t0 = time.perf_counter()
            batch = streams[name].next_batch()
            t1 = time.perf_counter()
            steppers[name](batch)
            t2 = time.perf_counter()
            if i:
                harvest[name].append(t1 - t0)
                total[name].append(t2 - t0)
    h = {k: statistics.median(v) for k, v in harvest.items()}
    t = {k: statistics.median(v) for k, v in total.items()}
    print(f"{lm.name}: hooks {','.join(many)} vs {one[0]}, {args.batch} tokens per step, "
          f"median of {args.batches}")
    for name, label in (("many", f"{len(many)} hooks"), ("one", "1 hook")):
        print(f"  {label:>8}: harvest {h[name]:.3f} s, whole step {t[name]:.3f} s "
              f"({args.batch / t[name]:.0f} tokens/s)")
    print("| what | 4 hooks (s) | 1 hook (s) | ratio |")
    print(f"| harvest (one pass) | {h['many']:.3f} | {h['one']:.3f} | "
          f"{h['many'] / h['one']:.2f}x |")
    print(f"| harvest + {len(many)} vs 1 SAE steps | {t['many']:.3f} | {t['one']:.3f} | "
          f"{t['many'] / t['one']:.2f}x |")
    print(f"| vs {len(many)} passes, one per hook (at most {len(many)} x the 1-hook step) | "
          f"{t['many']:.3f} | {len(many) * t['one']:.3f} | "
          f"{t['many'] / (len(many) * t['one']):.2f}x |")


def bench_cache(args) -> None:
    from saereg.training.cache import CacheSource, CacheStream, read_manifest, write_cache
    from saereg.training.lm import hook_dim, load_lm, resolve_hooks

    lm = load_lm(args.model)
    hooks = resolve_hooks(lm, [args.hook])
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_cache(lm, hooks, Path(tmp) / "c", args.batch * (args.batches + 4),
                    shard_tokens=args.batch * 2, heldout_tokens=0, progress=False)
        t_write = time.perf_counter() - t
        src = CacheSource(Path(tmp) / "c", read_manifest(Path(tmp) / "c"), torch.device("cpu"))
        s_cache = CacheStream(src, hooks, batch_tokens=args.batch, buffer_tokens=args.batch * 2)
        s_model = _stream(lm, hooks, args.batch, args.batch * 2)
        step = _steppers(hooks, hook_dim(lm, hooks[0]))
        med = timed({"model": lambda: step(s_model.next_batch()),
                     "cache": lambda: step(s_cache.next_batch())}, args.batches)
    n = args.batch * (args.batches + 4)
    print(f"{lm.name}: hook {hooks[0]}, {args.batch} tokens per step; writing the cache: "
          f"{n / t_write:.0f} tokens/s")
    for k, v in med.items():
        print(f"  {k:>6}: {v:.3f} s/step ({args.batch / v:.0f} tokens/s)")
    print(f"| {hooks[0]} | {args.batch / med['model']:.0f} | {args.batch / med['cache']:.0f} | "
          f"{med['model'] / med['cache']:.1f}x |")


CHILD = """
import resource, sys, torch, json
from pathlib import Path
from saereg.training.cache import CacheSource, CacheStream, read_manifest
from saereg.registry.sae.modules import SAEConfig, build_sae
from saereg.training.losses import LossSettings, compute_loss
path, tokens, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
m = read_manifest(path)
hook = m["hooks"][0]
src = CacheSource(path, m, torch.device("cpu"))
stream = CacheStream(src, [hook], batch_tokens=batch, buffer_tokens=8 * batch)
d = m["d_in"][hook]
sae = build_sae(SAEConfig(d_in=d, d_sae=8 * d, architecture="topk", k=16), seed=0)
opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
dead = torch.zeros(8 * d, dtype=torch.bool)
for _ in range(tokens // batch):
    compute_loss(sae, stream.next_batch()[hook], LossSettings(), dead).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "passes": stream.epoch}))
"""


def bench_memory(args) -> None:
    from saereg.training.fields import parse_count
    from saereg.training.cache import write_cache
    from saereg.training.lm import load_lm
    from saereg.training.tiny import build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        lm = load_lm(str(build_tiny_llama(Path(tmp) / "tiny")))
        write_cache(lm, ["model.layers.2"], Path(tmp) / "c", 65_536, shard_tokens=16384,
                    heldout_tokens=0, progress=False)
        rows = {}
        for budget in [parse_count(v) for v in args.tokens.split(",")]:
            out = subprocess.run([sys.executable, "-c", CHILD, str(Path(tmp) / "c"), str(budget),
                                  str(args.batch)], capture_output=True, text=True, check=True)
            rows[budget] = json.loads(out.stdout.strip().splitlines()[-1])
    base = next(iter(rows.values()))["maxrss_mb"]
    for budget, r in rows.items():
        print(f"| {budget:,} | {r['maxrss_mb']:.0f} MB | {r['maxrss_mb'] / base:.2f}x | "
              f"{r['passes']} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["hooks", "cache", "memory"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hooks", default="3,6,9,12")
    ap.add_argument("--hook", default="12")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--tokens", default="1M,10M")
    args = ap.parse_args()
    {"hooks": bench_hooks, "cache": bench_cache, "memory": bench_memory}[args.what](args)


if __name__ == "__main__":
    main()
