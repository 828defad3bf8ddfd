"""Planted features: does every architecture, at its defaults, recover known directions?

Writes planted-feature activations (saereg.training.planted: random unit directions in a lower
dimension, Zipf firing rates, about 2.5 active per sample, varied magnitudes) as an activation
cache, trains one SAE per architecture on it in one real ``saereg train --from-cache`` job
(run_training: MLflow runs, checkpoints, evaluation, saved folders) with one sparsity target
for all (k for topk, batchtopk and matryoshka; target_l0 for relu, jumprelu and gated) and
nothing else set, then scores each saved SAE on fresh samples: the share of planted
directions matched by a decoder row at cosine > 0.9, explained variance, dead latents and L0.
Goal: matched >= 0.9, EV >= 0.9, dead <= 5%, L0 within 1.5x of the target.

    python benchmarks/planted.py --features 512 --d 64 --samples 300k --target 3 --tokens 1M
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu", "gated")


def main() -> None:
    from saereg.training.config import parse_count

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--samples", type=parse_count, default=300_000)
    ap.add_argument("--target", type=int, default=3, help="k, and target_l0, for every SAE")
    ap.add_argument("--tokens", type=parse_count, default=1_000_000)
    ap.add_argument("--batch-tokens", type=parse_count, default=2048)
    ap.add_argument("--arch", default=",".join(ARCHS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="saereg-planted-"))
    os.environ.setdefault("SAEREG_HOME", str(work / "home"))  # runs and MLflow stay in here

    from saereg.registry.sae.folder import load_sae
    from saereg.training.config import K_ARCHITECTURES, SAETrainConfig, TrainConfig
    from saereg.training.job import run_training
    from saereg.training.planted import HOOK, PlantedFeatures, recovery, write_planted_cache

    planted = PlantedFeatures(n_features=args.features, d=args.d, seed=args.seed)
    cache = write_planted_cache(planted, work / "cache", args.samples)
    saes = [SAETrainConfig(hook=HOOK, architecture=a, **(
        {"k": args.target} if a in K_ARCHITECTURES else {"target_l0": float(args.target)}))
        for a in args.arch.split(",")]
    cfg = TrainConfig(model="planted-features", saes=saes, tokens=args.tokens,
                      batch_tokens=args.batch_tokens, buffer_tokens=max(65536, args.batch_tokens),
                      from_cache=str(cache), seed=args.seed)
    t0 = time.perf_counter()
    result = run_training(cfg, progress=False)
    elapsed = time.perf_counter() - t0
    print(f"{args.features} planted features in d={args.d}, {args.samples:,} samples, target "
          f"L0 {args.target}; {cfg.total_steps} steps of {args.batch_tokens} in {elapsed:.0f} s "
          f"(all SAEs); job {result.job_dir}")
    print("| architecture | d_sae | matched (cos > 0.9) | EV | dead | L0 | goal |")
    print("|---|---|---|---|---|---|---|")
    lo, hi = args.target / 1.5, args.target * 1.5
    for r in result.saes:
        sae = load_sae(r.folder)
        m = recovery(planted, sae)
        ok = (m["matched"] >= 0.9 and m["explained_variance"] >= 0.9 and m["dead"] <= 0.05
              and lo <= m["l0"] <= hi)
        print(f"| {r.architecture} | {sae.cfg.d_sae} | {m['matched']:.3f} | "
              f"{m['explained_variance']:.3f} | {m['dead']:.3f} | {m['l0']:.2f} | "
              f"{'met' if ok else 'missed'} |")


if __name__ == "__main__":
    main()
