"""How far can the ReLU-L1 objective go at a low L0, started at the answer?

A ReLU SAE with exactly one latent per planted feature (saereg.training.planted, the data of
benchmarks/planted.py) starts with its encoder and decoder at the planted directions, its
biases at 0, and is trained with the project's own ReLU-L1 loss (compute_loss: MSE + lambda
sum_i f_i ||W_dec,i||) for far longer than any default run, on fresh samples every step
(no data is ever repeated), with the target-L0 controller of the trainer bringing L0 to the
target and the learning rate decayed over the last fifth. Started from the answer and run far
longer than the trainer's default, where it settles shows what the objective itself makes of
this data at that L0: a goal above it is out of the reach of this loss, whatever the
trainer's defaults.

    python benchmarks/relu_l1_ceiling.py --target 3 --steps 20000 --batch 4096
"""

from __future__ import annotations

import argparse
import math
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--target", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bias-lr", type=float, default=None,
                    help="b_enc's rate (default: the trainer's, lr x sqrt(d))")
    ap.add_argument("--report-every", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from saereg.registry.sae.modules import SAEConfig, build_sae, expected_norm_scale
    from saereg.training.config import SAETrainConfig
    from saereg.training.losses import LossSettings, compute_loss
    from saereg.training.planted import PlantedFeatures, recovery, support_ev
    from saereg.training.sparsity import SparsityControl

    torch.set_num_threads(args.threads)
    planted = PlantedFeatures(n_features=args.features, d=args.d, seed=args.seed)
    sae = build_sae(SAEConfig(d_in=args.d, d_sae=args.features, architecture="relu"),
                    seed=args.seed).train()
    with torch.no_grad():
        sae.W_dec.copy_(planted.directions)
        sae.W_enc.copy_(planted.directions.T)
        sae.norm_scale.fill_(expected_norm_scale(planted.sample(65536, seed=1)[0]))
    spec = SAETrainConfig(hook="planted", architecture="relu", target_l0=args.target,
                          d_sae=args.features, lr=args.lr, bias_lr=args.bias_lr)
    control = SparsityControl(spec, args.steps * args.batch)
    biases = [sae.b_enc]
    weights = [p for p in sae.parameters() if p is not sae.b_enc]
    opt = torch.optim.Adam([{"params": weights, "lr": args.lr},
                            {"params": biases, "lr": spec.bias_lr_of(args.d)}])
    base = [g["lr"] for g in opt.param_groups]
    decay_from = int(0.8 * args.steps)
    dead = torch.zeros(args.features, dtype=torch.bool)
    print(f"ReLU-L1 from the planted directions: {args.features} features in d={args.d}, "
          f"target L0 {args.target:g}, {args.steps} steps of {args.batch} fresh samples, lr "
          f"{args.lr:g}, bias lr {spec.bias_lr_of(args.d):g}")
    print("| step | EV | L0 | dead | matched | lambda | mean encoder gain |")
    print("|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        frac = 1.0 if step <= decay_from else (args.steps - step) / (args.steps - decay_from)
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = lr * frac
        x, _ = planted.sample(args.batch, seed=10_000 + step)
        out = compute_loss(sae, x, LossSettings(sparsity_coefficient=control.at(0, 1)), dead)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        with torch.no_grad():
            sae.set_decoder_norm_to_unit()
        control.update(float((out.acts > 0).sum(-1).float().mean()))
        if step % args.report_every == 0 or step == args.steps:
            m = recovery(planted, sae)
            gain = float((sae.W_enc.detach().T * planted.directions).sum(1).mean())
            print(f"| {step} | {m['explained_variance']:.3f} | {m['l0']:.2f} | "
                  f"{m['dead']:.3f} | {m['matched']:.3f} | {control.at(0, 1):.2f} | "
                  f"{gain:.2f} |", flush=True)
            sae.train()
    m = recovery(planted, sae)
    print(f"final: EV {m['explained_variance']:.3f}, EV with the best magnitudes on its own "
          f"firing pattern {support_ev(planted, sae):.3f}, L0 {m['l0']:.2f}, dead "
          f"{m['dead']:.3f}, in {time.perf_counter() - t0:.0f} s")
    if not math.isfinite(m["explained_variance"]):
        raise SystemExit("training diverged")


if __name__ == "__main__":
    main()
