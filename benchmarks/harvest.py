"""Harvest speed: capturing a middle layer with early stop vs a full forward pass.

Runs both on the same token batches of the offline corpus, interleaved (A B A B ...), so the
ratio is measured in one run on the same machine state. Prints a Markdown row for RESULTS.md.

    python benchmarks/harvest.py [--model smollm2-135m] [--hook model.layers.15] [--batches 6]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default="model.layers.15")
    ap.add_argument("--hooks", default=None,
                    help="comma-separated hooks for a multi-hook row (default: the single hook)")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context-size", type=int, default=128)
    args = ap.parse_args()

    from saereg.training.data import TokenWindows
    from saereg.training.lm import ActivationCapture, load_lm

    lm = load_lm(args.model)
    hooks = args.hooks.split(",") if args.hooks else [args.hook]
    windows = TokenWindows(lm.tokenizer, args.context_size)
    batches = [ids for ids, _ in itertools.islice(windows.batches(args.batch_size), args.batches)]
    early = ActivationCapture(lm, hooks, early_stop=True)
    captured_full = ActivationCapture(lm, hooks, early_stop=False)

    def full(ids):  # the whole model, logits included, with the same hooks recording
        from saereg.training.lm import splice

        out = {}
        with contextlib.ExitStack() as st, torch.inference_mode():
            for h in hooks:
                st.enter_context(splice(lm, h, lambda o, h=h: out.__setitem__(h, o) or o))
            lm.model(input_ids=ids.to(lm.device))
        return out

    early(batches[0]); full(batches[0]); captured_full(batches[0])  # warm-up
    times = {"early": [], "body": [], "full": []}
    for ids in batches:
        for name, fn in (("early", early), ("body", captured_full), ("full", full)):
            t = time.perf_counter()
            fn(ids)
            times[name].append(time.perf_counter() - t)
    tokens = batches[0].numel()
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"model {lm.name}, hooks {','.join(hooks)}, {args.batches} batches of "
          f"{args.batch_size}x{args.context_size} tokens, torch threads {torch.get_num_threads()}")
    for k, v in rate.items():
        print(f"  {k:>6}: {v:8.0f} tokens/s (median)")
    print(f"| {','.join(hooks)} | {rate['early']:.0f} | {rate['full']:.0f} | "
          f"{rate['early'] / rate['full']:.2f}x |")


if __name__ == "__main__":
    main()
