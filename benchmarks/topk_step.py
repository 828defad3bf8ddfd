"""TopK training step: this project (sparse kernels, and its dense reference) vs eai-sparsify's
SparseCoder and sae-lens's TopKTrainingSAE, on the same activations, interleaved in one run.

A step is what each trainer does per batch of ``--batch`` tokens: forward, loss, backward,
its own bookkeeping and clipping, an Adam step and its decoder constraints:

- ours, as SAETrainingModule.training_step: compute_loss with the dead mask from the latents'
  token counters, the firing counts recorded, the finiteness checks, clip_grad_norm_ at 1.0,
  the decoder gradient's radial part removed, Adam, decoder rows back to unit norm; AuxK with
  k_aux = d_in // 2;
- sparsify, as its Trainer's fvu step: decoder rows to unit norm, the batch's total variance,
  forward with the dead mask from ``num_tokens_since_fired``, did_fire updated, both loss
  terms read out, (fvu + auxk_alpha * auxk).backward(), the parallel gradient removed, Adam,
  the token counters updated (no clipping, as in its trainer);
- sae-lens, as SAETrainer._train_step: training_forward_pass with the dead mask from
  ``n_forward_passes_since_fired``, its firing statistics, backward, clip_grad_norm_ at 1.0,
  Adam.

``--dead`` marks that fraction of the latents dead (the same latents for every contender):
before each step their counters are set past the trainer's dead threshold, so each trainer
computes its dead mask as it always does and runs AuxK over them (sparsify with
auxk_alpha = 1/32, the paper's value, which its config leaves at 0 by default). Every
contender gets the same fused Adam, so the ratios compare the SAE kernels. Each repeat times
``--steps`` consecutive steps of each contender in turn.

The GEMM-bound limit is the one matrix product every dense-encoder TopK SAE must do, x @ W_enc
([B, d_in] x [d_in, d_sae]) into an output allocated once, timed in the same loop; "GEMMs per
step" is our step time over it. ``--precision bf16-mixed`` runs every contender's forward (and
the GEMM) under bfloat16 autocast, float32 weights and Adam, as ``saereg train --precision
bf16-mixed`` does; ``--device cuda`` runs it all on a GPU. Needs ``pip install -e '.[bench]'``.

    python benchmarks/topk_step.py --d-sae 4608,36864 --dead 0,0.1 --repeats 3 --steps 3
    python benchmarks/topk_step.py --d-sae 4608,36864 --repeats 3 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

DEAD_WINDOW = 10**6  # tokens (ours, sparsify) or steps (sae-lens): the dead threshold


def forward_context(device: str, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ours(d_in, d_sae, k, marked, device, precision, sparse=True):
    from saereg.registry.sae.modules import SAEConfig, build_sae
    from saereg.training.losses import LossSettings, compute_loss
    from saereg.training.module import LatentStats

    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k), seed=0).to(device)
    stats = LatentStats(d_sae).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    settings = LossSettings(aux_k=d_in // 2, sparse_topk=sparse)

    def step(x):
        stats.tokens_since_fired[marked] = DEAD_WINDOW
        if not torch.isfinite(x).all():
            raise RuntimeError("non-finite activations")
        dead = stats.tokens_since_fired >= DEAD_WINDOW
        with forward_context(device, precision):
            out = compute_loss(sae, x, settings, dead)
        counts = stats.fire_counts(out)
        if not torch.isfinite(out.loss):
            raise RuntimeError("non-finite loss")
        stats.record(counts, x.shape[0], True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        sae.remove_decoder_radial_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            sae.set_decoder_norm_to_unit()
    return step


def sparsify_step(d_in, d_sae, k, marked, device, precision):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    did_fire = torch.zeros(d_sae, dtype=torch.bool, device=device)
    auxk_alpha = 1 / 32

    def step(x):
        since_fired[marked] = DEAD_WINDOW + 1
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > DEAD_WINDOW
        total_variance = (x - x.mean(0)).pow(2).sum()
        with forward_context(device, precision):
            out = sae(x, x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach()), float(out.auxk_loss.detach())
        (out.fvu + auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()
    return step


def saelens_step(d_in, d_sae, k, marked, device, precision):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k)).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    since_fired = torch.zeros(d_sae, device=device)
    act_freq = torch.zeros(d_sae, device=device)
    n_steps = [0]

    def step(x):
        since_fired[marked] = DEAD_WINDOW + 1
        sae.train()
        with forward_context(device, precision):
            out = sae.training_forward_pass(TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=(since_fired > DEAD_WINDOW).bool(),
                n_training_steps=n_steps[0], is_logging_step=False))
            with torch.no_grad():
                firing = out.feature_acts.bool().float()
                did_fire = firing.sum(-2).bool()
                since_fired.add_(1)
                since_fired[did_fire] = 0
                act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        n_steps[0] += 1
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", default="4608,36864")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dead", default="0,0.1", help="fractions of latents held dead")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="consecutive steps timed per repeat")
    ap.add_argument("--skip", default="", help="contenders to leave out, e.g. 'dense ref'")
    ap.add_argument("--precision", choices=("32", "bf16-mixed"), default="32")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = args.device
    sync = torch.cuda.synchronize if torch.device(dev).type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, device {dev}, precision {args.precision}, threads "
          f"{torch.get_num_threads()}, batch {args.batch}, d_in {args.d_in}, k {args.k}, "
          f"k_aux {args.d_in // 2}, {args.steps} steps x {args.repeats} repeats")
    g = torch.Generator().manual_seed(0)
    gemm_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    rows = []
    for d_sae in [int(v) for v in args.d_sae.split(",")]:
        for frac in [float(v) for v in args.dead.split(",")]:
            x = torch.randn(args.batch, args.d_in, generator=g).to(dev)
            marked = torch.randperm(d_sae, generator=g)[:round(frac * d_sae)].to(dev)
            w = torch.randn(args.d_in, d_sae, generator=g).to(dev, gemm_dtype)
            gemm_out = torch.empty(args.batch, d_sae, dtype=gemm_dtype, device=dev)
            a = (args.d_in, d_sae, args.k, marked, dev, args.precision)
            makers = {
                "ours (sparse)": lambda: ours(*a),
                "ours (dense ref)": lambda: ours(*a, sparse=False),
                "sparsify": lambda: sparsify_step(*a),
                "sae-lens": lambda: saelens_step(*a),
                "GEMM x@W_enc": lambda: (lambda x, w=w, o=gemm_out:
                                         torch.mm(x.to(w.dtype), w, out=o)),
            }
            skip = {v.strip() for v in args.skip.split(",") if v.strip()}
            impls = {n: m() for n, m in makers.items()
                     if n not in skip and n.removeprefix("ours (").rstrip(")") not in skip}
            times = {name: [] for name in impls}
            for fn in impls.values():  # warm-up (allocations, Adam state)
                fn(x)
            for _ in range(args.repeats):
                for name, fn in impls.items():
                    sync()
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        fn(x)
                    sync()
                    times[name].append((time.perf_counter() - t) / args.steps)
            med = {n: statistics.median(v) for n, v in times.items()}
            peers = [med[p] for p in ("sparsify", "sae-lens") if p in med]
            ours_t = med["ours (sparse)"]
            print(f"\nd_sae {d_sae}, dead {frac:g} ({len(marked)} latents): median s/step over "
                  f"{args.repeats} interleaved repeats of {args.steps} steps")
            for n, t in med.items():
                print(f"  {n:>17}: {t:7.3f} s  ({args.batch / t:8.0f} tokens/s)")
            cell = lambda n: f"{med[n]:.3f}" if n in med else "-"  # noqa: E731
            ratio = lambda n: f"{med[n] / ours_t:.2f}x" if n in med else "-"  # noqa: E731
            gemms = f"{ours_t / med['GEMM x@W_enc']:.2f}" if "GEMM x@W_enc" in med else "-"
            best = f"{min(peers) / ours_t:.2f}x" if peers else "-"
            rows.append(f"| {d_sae} | {frac:g} | {ours_t:.3f} | {cell('ours (dense ref)')} | "
                        f"{cell('sparsify')} | {cell('sae-lens')} | {ratio('sparsify')} | "
                        f"{ratio('sae-lens')} | {best} | {gemms} |")
            del impls
    print("\n| d_sae | dead | ours (s) | ours, dense ref (s) | sparsify (s) | sae-lens (s) | "
          "vs sparsify | vs sae-lens | vs faster peer | GEMMs per step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
