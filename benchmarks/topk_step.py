"""TopK training step: this project (sparse kernels, and its dense reference) vs eai-sparsify's
SparseCoder and sae-lens's TopKTrainingSAE, on the same activations, interleaved in one run.

A step is forward, loss, backward and an Adam step on ``--batch`` tokens (no dead latents, so
no AuxK term anywhere); every contender gets the same fused Adam, so the ratios compare the
SAE kernels. The GEMM-bound limit is the one matrix product every dense-encoder
TopK SAE must do, x @ W_enc ([B, d_in] x [d_in, d_sae]) into an output allocated once, timed
in the same loop; its share is t_gemm / t_step. ``--precision bf16-mixed`` runs every
contender's forward (and the GEMM) under bfloat16 autocast, float32 weights and Adam, as
``saereg train --precision bf16-mixed`` does; ``--device cuda`` runs it all on a GPU. Needs
``pip install -e '.[bench]'``.

    python benchmarks/topk_step.py --d-sae 4608,36864 --repeats 3
    python benchmarks/topk_step.py --d-sae 4608,36864 --repeats 3 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def forward_context(device: str, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ours(d_in, d_sae, k, sparse, device, precision):
    from saereg.registry.sae.modules import SAEConfig, build_sae
    from saereg.training.losses import LossSettings, compute_loss

    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k), seed=0).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
    settings = LossSettings(sparse_topk=sparse)

    def step(x):
        with forward_context(device, precision):
            out = compute_loss(sae, x, settings, dead)
        out.loss.backward()
        sae.remove_decoder_radial_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            sae.set_decoder_norm_to_unit()
    return step


def sparsify_step(d_in, d_sae, k, device, precision):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

    def step(x):
        with forward_context(device, precision):
            out = sae(x, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
    return step


def saelens_step(d_in, d_sae, k, device, precision):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k)).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

    def step(x):
        with forward_context(device, precision):
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
    ap.add_argument("--precision", choices=("32", "bf16-mixed"), default="32")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = args.device
    sync = torch.cuda.synchronize if torch.device(dev).type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, device {dev}, precision {args.precision}, threads "
          f"{torch.get_num_threads()}, batch {args.batch}, d_in {args.d_in}, k {args.k}")
    g = torch.Generator().manual_seed(0)
    gemm_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    for d_sae in [int(v) for v in args.d_sae.split(",")]:
        x = torch.randn(args.batch, args.d_in, generator=g).to(dev)
        w = torch.randn(args.d_in, d_sae, generator=g).to(dev, gemm_dtype)
        gemm_out = torch.empty(args.batch, d_sae, dtype=gemm_dtype, device=dev)
        impls = {
            "ours (sparse)": ours(args.d_in, d_sae, args.k, True, dev, args.precision),
            "ours (dense ref)": ours(args.d_in, d_sae, args.k, False, dev, args.precision),
            "sparsify": sparsify_step(args.d_in, d_sae, args.k, dev, args.precision),
            "sae-lens": saelens_step(args.d_in, d_sae, args.k, dev, args.precision),
            "GEMM x@W_enc": lambda x, w=w, o=gemm_out: torch.mm(x.to(w.dtype), w, out=o),
        }
        times = {name: [] for name in impls}
        for name, fn in impls.items():  # warm-up
            fn(x)
        for _ in range(args.repeats):
            for name, fn in impls.items():
                sync()
                t = time.perf_counter()
                fn(x)
                sync()
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
