"""Eager vs torch.compile'd loss, one training step per architecture (forward, loss, backward,
fused Adam), on the same activations, interleaved in one run; what ``saereg train --compile``
decides from (saereg.training.losses.COMPILED_ARCHITECTURES).

    python benchmarks/compile_step.py --arch relu,jumprelu,gated,batchtopk --d-sae 4608
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def make_step(arch: str, d_in: int, d_sae: int, compiled: bool):
    from saereg.registry.sae.modules import SAEConfig, build_sae
    from saereg.training.losses import LossSettings, compute_loss

    kw = {"k": 32} if arch in ("topk", "batchtopk", "matryoshka") else {}
    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, **kw), seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    settings = LossSettings(sparsity_coefficient=1e-3, sparse_topk=False)
    loss = torch.compile(compute_loss) if compiled else compute_loss

    def step(x):
        loss(sae, x, settings, dead).loss.backward()
        sae.remove_decoder_radial_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="relu,jumprelu,gated,batchtopk")
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"d_in {args.d_in}, d_sae {args.d_sae}")
    x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(0))
    print("| architecture | eager (s) | compiled (s) | compiled / eager | first compiled step (s) |")
    print("| --- | --- | --- | --- | --- |")
    for arch in args.arch.split(","):
        eager, comp = make_step(arch, args.d_in, args.d_sae, False), make_step(
            arch, args.d_in, args.d_sae, True)
        eager(x)
        t = time.perf_counter()
        comp(x)
        first = time.perf_counter() - t
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for name, fn in (("eager", eager), ("compiled", comp)):
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
        e, c = (statistics.median(times[n]) for n in ("eager", "compiled"))
        print(f"| {arch} | {e:.3f} | {c:.3f} | {c / e:.2f} | {first:.1f} |")


if __name__ == "__main__":
    main()
