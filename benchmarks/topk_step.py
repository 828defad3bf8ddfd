"""TopK training step: this project (sparse kernels, and its dense reference) vs eai-sparsify's
SparseCoder and sae-lens's TopKTrainingSAE, on the same activations, interleaved in one run.

A step is forward, loss, backward and an Adam step on ``--batch`` tokens (no dead latents, so
no AuxK term anywhere); every contender gets the same fused Adam, so the ratios compare the
SAE kernels. The GEMM-bound limit is the one matrix product every dense-encoder
TopK SAE must do, x @ W_enc ([B, d_in] x [d_in, d_sae]) into an output allocated once, timed
in the same loop; its share is t_gemm / t_step. Needs ``pip install -e '.[bench]'``.

    python benchmarks/topk_step.py --d-sae 4608,36864 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def ours(d_in, d_sae, k, sparse):
    from registry.sae import SAEConfig, build_sae
    from training.losses import LossSettings, compute_loss

    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k), seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    settings = LossSettings(sparse_topk=sparse)

    def step(x):
        out = compute_loss(sae, x, settings, dead)
        out.loss.backward()
        sae.remove_decoder_radial_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            sae.set_decoder_norm_to_unit()
    return step


def sparsify_step(d_in, d_sae, k):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

    def step(x):
        out = sae(x, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
    return step


def saelens_step(d_in, d_sae, k):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

    def step(x):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={},
                                                       dead_neuron_mask=None,
                                                       n_training_steps=0,
                                                       is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", default="4608,36864")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"d_in {args.d_in}, k {args.k}")
    g = torch.Generator().manual_seed(0)
    for d_sae in [int(v) for v in args.d_sae.split(",")]:
        x = torch.randn(args.batch, args.d_in, generator=g)
        w = torch.randn(args.d_in, d_sae, generator=g)
        gemm_out = torch.empty(args.batch, d_sae)
        impls = {
            "ours (sparse)": ours(args.d_in, d_sae, args.k, True),
            "ours (dense ref)": ours(args.d_in, d_sae, args.k, False),
            "sparsify": sparsify_step(args.d_in, d_sae, args.k),
            "sae-lens": saelens_step(args.d_in, d_sae, args.k),
            "GEMM x@W_enc": lambda x, w=w, o=gemm_out: torch.mm(x, w, out=o),
        }
        times = {name: [] for name in impls}
        for name, fn in impls.items():  # warm-up
            fn(x)
        for _ in range(args.repeats):
            for name, fn in impls.items():
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
        med = {n: statistics.median(v) for n, v in times.items()}
        peer = min(med["sparsify"], med["sae-lens"])
        print(f"\nd_sae {d_sae}: median s/step over {args.repeats} interleaved repeats")
        for n, t in med.items():
            print(f"  {n:>17}: {t:7.3f} s  ({args.batch / t:8.0f} tokens/s)")
        ours_t = med["ours (sparse)"]
        print(f"| {d_sae} | {ours_t:.3f} | {med['ours (dense ref)']:.3f} | {med['sparsify']:.3f} | "
              f"{med['sae-lens']:.3f} | {peer / ours_t:.2f}x | {med['GEMM x@W_enc'] / ours_t:.0%} |")


if __name__ == "__main__":
    main()
