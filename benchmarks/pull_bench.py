"""Pull by release name: time and bytes of a pull of a 16k-wide SAE from the local hub server,
and of its second pull.

The project's hub-compatible test server (tests/hubserver.py) holds a Gemma Scope repo with one
SAE laid out as the real release is (``layer_12/width_16k/average_l0_82/params.npz``, float32,
random weights, d_in 2304 as Gemma-2-2B by default) and a release table naming it. The real
huggingface_hub client pulls it by name into a fresh SQLite catalog (MLflow mirror on its sqlite
store): resolve the commit, list and download the file, check it against the listing, convert,
check the encode against the layout's reference, register. The second pull of the same SAE is
then timed: it finds the recorded pull by repo, path and commit and downloads nothing. Bytes are
those of the files downloaded (as the Hub lists them); file requests are counted on the server.
The process is warmed up first by one small pull (imports, MLflow store, migrations).

    python benchmarks/pull_bench.py [--d-in 2304] [--d-sae 16384]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path


def params_npz(d_in: int, d_sae: int, seed: int) -> bytes:
    import numpy as np

    g = np.random.default_rng(seed)
    arrays = {"W_enc": g.standard_normal((d_in, d_sae), dtype=np.float32) * 0.02,
              "W_dec": g.standard_normal((d_sae, d_in), dtype=np.float32) * 0.02,
              "b_enc": g.standard_normal(d_sae, dtype=np.float32) * 0.01,
              "b_dec": g.standard_normal(d_in, dtype=np.float32) * 0.01,
              "threshold": np.abs(g.standard_normal(d_sae, dtype=np.float32)) * 0.05}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=2304)
    p.add_argument("--d-sae", type=int, default=16384)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import pytest
    import yaml
    from hubserver import serve_hub_online

    with tempfile.TemporaryDirectory(prefix="saereg-pull-bench-") as tmp:
        tmp = Path(tmp)
        mp = pytest.MonkeyPatch()
        for var in ("SAEREG_DATABASE_URL", "MLFLOW_TRACKING_URI", "SAEREG_ARTIFACT_STORE"):
            mp.delenv(var, raising=False)
        mp.setenv("SAEREG_HOME", str(tmp / "home"))
        hub = serve_hub_online(mp, tmp / "hf-home", "hf_benchTOKEN0123456789")
        srv = next(hub)
        try:
            from saereg.registry.hub.release_pull import pull_release

            repo, path = "google/gemma-scope-bench-pt-res", "layer_12/width_16k/average_l0_82"
            srv.state.put_files(repo, {"layer_0/width_16k/average_l0_8/params.npz":
                                       params_npz(64, 256, 0),
                                       f"{path}/params.npz": params_npz(args.d_in, args.d_sae, 1)})
            table = {"gemma-scope-bench-pt-res": {
                "repo_id": repo, "model": "gemma-2-2b", "conversion_func": "gemma_2",
                "saes": [{"id": "layer_0/width_16k/average_l0_8",
                          "path": "layer_0/width_16k/average_l0_8"},
                         {"id": path, "path": path, "l0": 82,
                          "neuronpedia": "gemma-2-2b/12-gemmascope-res-16k"}]}}
            (tmp / "pretrained_saes.yaml").write_text(yaml.safe_dump(table))
            mp.setenv("SAEREG_RELEASES", str(tmp / "pretrained_saes.yaml"))
            pull_release("gemma-scope-bench-pt-res", "layer_0/width_16k/average_l0_8")  # warm-up

            def files() -> int:
                return sum(1 for _, route in srv.state.requests if route == "resolve")

            rows = []
            for label in ("first pull", "second pull"):
                before, t0 = files(), time.perf_counter()
                got = pull_release("gemma-scope-bench-pt-res", path)
                rows.append((label, time.perf_counter() - t0, got.downloaded_bytes,
                             files() - before, got.added, got.ref))
            print(f"Gemma Scope SAE d_in={args.d_in} d_sae={args.d_sae} (params.npz "
                  f"{len(srv.files(repo)[path + '/params.npz']) / 1e6:.1f} MB), "
                  f"{os.cpu_count()} CPUs")
            print("| pull | time | bytes downloaded | file requests (HEAD + GET) | added |")
            print("| --- | --- | --- | --- | --- |")
            for label, secs, size, n, added, ref in rows:
                took = f"{secs:.2f} s" if secs >= 1 else f"{secs * 1000:.0f} ms"
                print(f"| {label} | {took} | {size / 1e6:.1f} MB | {n} | "
                      f"{'yes, ' + ref if added else 'no (' + ref + ')'} |")
        finally:
            next(hub, None)
            mp.undo()


if __name__ == "__main__":
    main()
