"""Planted features: does every architecture, at its defaults, recover known directions?

Writes planted-feature activations (saereg.training.planted: random unit directions in a lower
dimension, Zipf firing rates, about 2.5 active per sample, varied magnitudes) as an activation
cache, trains one SAE per architecture on it in one real ``saereg train --from-cache`` job
(run_training: MLflow runs, checkpoints, evaluation, saved folders) with one sparsity target
for all (k for topk, batchtopk and matryoshka; target_l0 for relu, jumprelu and gated) and
nothing else set, then scores each saved SAE on fresh samples: the share of planted
directions matched by a decoder row at cosine > 0.9 (and by the row of a latent that fires),
explained variance, dead latents and L0. Goal: matched >= 0.9, EV >= 0.9, dead <= 5%, L0
within 1.5x of the target. ``--target`` takes a list (``3,6,12``): every architecture at every
target, from the same one pass (a sweep). Where JumpReLU was trained, a last line scores a
ReLU SAE built from its encoder (relu(pre - threshold), least-squares decoder): what a ReLU
encoder can reach at that L0 whatever its objective. "EV, best magnitudes" keeps each SAE's
firing pattern and fits the magnitudes per sample by least squares: it separates the cost of
which latents fire from the cost of their magnitudes. A second table splits matched by the
features' firing rate (bands of features ranked by rate, saereg.training.planted.matched_by_rate).

    python benchmarks/planted.py --features 512 --d 64 --samples 300k --target 3 --tokens 4M
    python benchmarks/planted.py --set revive_until=0.8     # split revival for every architecture
    python benchmarks/planted.py --arch relu,gated --target 3,4.5,6,9,12
"""

from __future__ import annotations

import argparse
import ast
import os
import tempfile
import time
from pathlib import Path

ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu", "gated")


def main() -> None:
    from saereg.training.fields import parse_count

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--samples", type=parse_count, default=300_000)
    ap.add_argument("--target", default="3",
                    help="k (rounded), and target_l0, for every SAE; a list sweeps them all")
    ap.add_argument("--tokens", type=parse_count, default=4_000_000)
    ap.add_argument("--batch-tokens", type=parse_count, default=2048)
    ap.add_argument("--arch", default=",".join(ARCHS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="an SAETrainConfig field for every SAE (repeatable), e.g. "
                         "--set preact_coefficient=0")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="saereg-planted-"))
    os.environ.setdefault("SAEREG_HOME", str(work / "home"))  # runs and MLflow stay in here

    from saereg.registry.sae.folder import load_sae
    from saereg.training.config import K_ARCHITECTURES, SAETrainConfig, TrainConfig
    from saereg.training.job import run_training
    from saereg.training.planted import (HOOK, PlantedFeatures, matched_by_rate, recovery,
                                         relu_with_encoder_of, support_ev, write_planted_cache)

    planted = PlantedFeatures(n_features=args.features, d=args.d, seed=args.seed)
    cache = write_planted_cache(planted, work / "cache", args.samples)
    targets = [float(t) for t in args.target.split(",")]
    extra = {}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            extra[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[name] = value
    saes = [SAETrainConfig(hook=HOOK, architecture=a, **extra, **(
        {"k": round(t)} if a in K_ARCHITECTURES else {"target_l0": t}))
        for a in args.arch.split(",") for t in targets]
    cfg = TrainConfig(model="planted-features", saes=saes, tokens=args.tokens,
                      batch_tokens=args.batch_tokens, buffer_tokens=max(65536, args.batch_tokens),
                      from_cache=str(cache), seed=args.seed)
    t0 = time.perf_counter()
    result = run_training(cfg, progress=False)
    elapsed = time.perf_counter() - t0
    print(f"{args.features} planted features in d={args.d}, {args.samples:,} samples, target "
          f"L0 {args.target}; {cfg.total_steps} steps of {args.batch_tokens} in {elapsed:.0f} s "
          f"(all SAEs); job {result.job_dir}")
    print("| architecture | target | d_sae | matched (cos > 0.9) | matched, live rows | EV | "
          "EV, best magnitudes | dead | L0 | goal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    jumprelu, bands = [], []
    for spec, r in zip(saes, result.saes):
        assert spec.architecture == r.architecture  # the job keeps the order of cfg.saes
        target = spec.target_l0 if spec.target_l0 is not None else spec.k
        sae = load_sae(r.folder)
        m = recovery(planted, sae)
        ok = (m["matched"] >= 0.9 and m["explained_variance"] >= 0.9 and m["dead"] <= 0.05
              and target / 1.5 <= m["l0"] <= target * 1.5)
        print(f"| {r.architecture} | {target:g} | {sae.cfg.d_sae} | {m['matched']:.3f} | "
              f"{m['matched_live']:.3f} | {m['explained_variance']:.3f} | "
              f"{support_ev(planted, sae):.3f} | {m['dead']:.3f} | "
              f"{m['l0']:.2f} | {'met' if ok else 'missed'} |")
        bands.append((r.architecture, target, matched_by_rate(planted, sae)))
        if r.architecture == "jumprelu":
            jumprelu.append((target, sae))
    heads = [f"ranks {lo}-{hi} ({rate * args.samples:,.0f} per {args.samples:,})"
             for lo, hi, rate, _ in bands[0][2]]
    print("\nMatched (cos > 0.9) by firing rate: features ranked by rate, their mean number of "
          "samples fired on in the cache")
    print("| architecture | target | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * len(heads))
    for arch, target, row in bands:
        print(f"| {arch} | {target:g} | " + " | ".join(f"{m:.2f}" for *_, m in row) + " |")
    print()
    for target, sae in jumprelu:
        m = relu_with_encoder_of(planted, sae)
        print(f"ReLU SAE from the JumpReLU (target {target:g}) encoder, relu(pre - threshold) and "
              f"a least-squares decoder: EV {m['explained_variance']:.3f}, L0 {m['l0']:.2f}")


if __name__ == "__main__":
    main()
