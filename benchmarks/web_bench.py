"""Web app speed: `saereg serve` on a 65,536-feature SAE version with stats and labels (SQLite).

A fresh ``SAEREG_HOME`` gets one TopK SAE for SmolLM2-135M-Instruct (``model.layers.6``, d_in 576,
d_sae 65,536, random weights) registered through the public API, one stats run with a row per
feature of the size the analyze pass writes (40-bin histogram, 20 top examples and 4 x 3
interval examples of 17 tokens each, 10 + 10 logits) and one label per feature (6 words of a
20,000-word vocabulary; every 16th feature has a second, older label), filled with direct
inserts. The real ``saereg serve`` then runs as a subprocess on 127.0.0.1 and is timed from a
client on the same machine (times include the loopback round trip):

1. feature page ``/sae/REF/feature/I`` and its JSON twin ``/api/sae/REF/feature/I`` at random
   indices, p50 / p95 (target p95 < 100 ms); label search ``/api/search?q=`` and the ``/search``
   page for random one-word queries, p50 / p95 of the round trip and of the server time (the
   app's ``Server-Timing`` header);
2. live prompt (``POST /api/sae/REF/prompt``, SSE) with a 20-token prompt once the model is
   warm: time to the first shaded token and to ``done``, in feature mode and in top mode
   (target: first tokens < 1 s);
3. steering (``POST /api/sae/REF/steer``, SSE, 20 new tokens): time to the first streamed token
   and to ``done``;
4. ``--clients`` concurrent clients (one connection each) on random feature pages for
   ``--seconds``: requests, errors, p50 / p95.

    python benchmarks/web_bench.py [--d-sae 65536] [--requests 200] [--clients 20] \\
        [--seconds 30] [--models-from DIR] [--home DIR]

``--models-from DIR`` links ``DIR/smollm2-135m`` (an already converted SmolLM2, e.g.
``~/.saereg/models``) into the scratch home; without it the packaged GGUF is converted first
(about 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODEL, HOOK, D_IN = "smollm2-135m", "model.layers.6", 576
N_VOCAB, WORDS_PER_LABEL = 20_000, 6
PROMPT_WORDS = ("The quick brown fox jumps over the lazy dog while the old farmer walks "
                "slowly to the market with a basket of fresh apples and bread for his family")


def pct(times: list[float], q: float) -> float:
    s = sorted(times)
    return s[min(len(s) - 1, int(len(s) * q))] * 1e3


def summary(times: list[float]) -> str:
    return f"p50 {pct(times, 0.5):.1f} ms, p95 {pct(times, 0.95):.1f} ms (n={len(times)})"


# -- the catalog ---------------------------------------------------------------------------------

def _example(rng: random.Random, vocab: list[str], act: float) -> dict:
    n = 17
    acts = [round(rng.random() * act, 5) for _ in range(n)]
    acts[12] = round(act, 5)
    toks = [f"\u0120{rng.choice(vocab)}" for _ in range(n)]
    return {"activation": act, "window": rng.randrange(512), "position": rng.randrange(128),
            "peak": 12, "tokens": toks, "token_ids": [rng.randrange(49152) for _ in range(n)],
            "acts": acts, "doc_id": f"pydoc:mod{rng.randrange(300)}",
            "doc_offset": rng.randrange(10_000)}


def fill_stats(url: str, version_id: int, d_sae: int, vocab: list[str]) -> int:
    """One stats run with a row per feature, inserted directly; returns its id."""
    from sqlalchemy import text

    from saereg.registry.catalog import db

    rng = random.Random(0)
    pool = [_example(rng, vocab, 1.0) for _ in range(512)]
    eng = db.get_engine(url)
    with eng.begin() as conn:
        run_id = conn.execute(text(
            "INSERT INTO stats_runs (version_id, dataset, tokens, context_size, code_version, "
            "params, created_at, created_by) VALUES (:v, 'saereg:default-corpus', 65536, 128, "
            "'bench', '{}', CURRENT_TIMESTAMP, 'bench') RETURNING id"), {"v": version_id}).scalar()
        sql = text("INSERT INTO feature_stats (stats_run_id, feature_index, firing_rate, "
                   "mean_activation, max_activation, flag, histogram, top_examples, "
                   "interval_examples, top_logits, bottom_logits) VALUES (:r, :i, :rate, :mean, "
                   ":peak, :flag, :hist, :top, :intervals, :tl, :bl)")
        step = 4096
        for lo in range(0, d_sae, step):
            rows = []
            for i in range(lo, min(d_sae, lo + step)):
                peak = 1 + rng.random() * 9
                top = [dict(e, activation=peak * (1 - r / 40)) for r, e in
                       enumerate(rng.sample(pool, 20))]
                intervals = [{"low": peak * j / 4, "high": peak * (j + 1) / 4,
                              "examples": rng.sample(pool, 3)} for j in range(4)]
                logits = [[f"\u0120{rng.choice(vocab)}", round(rng.gauss(0, 1), 5)]
                          for _ in range(20)]
                rate = 10 ** (-rng.random() * 5)
                rows.append({
                    "r": run_id, "i": i, "rate": rate, "mean": peak / 3, "peak": peak,
                    "flag": "dense" if rate > 0.1 else None,
                    "hist": json.dumps({"log10_low": -4.0, "log10_high": 4.0,
                                        "counts": [rng.randrange(500) for _ in range(40)]}),
                    "top": json.dumps(top), "intervals": json.dumps(intervals),
                    "tl": json.dumps(logits[:10]), "bl": json.dumps(logits[10:])})
            conn.execute(sql, rows)
    return run_id


def fill_labels(url: str, version_id: int, d_sae: int, vocab: list[str]) -> None:
    from sqlalchemy import text

    from saereg.registry.catalog import db

    rng = random.Random(2)
    sql = text("INSERT INTO feature_labels (version_id, feature_index, text, method, status, "
               "created_at, created_by) VALUES (:v, :i, :t, :m, 'candidate', CURRENT_TIMESTAMP, "
               "'bench')")
    with db.get_engine(url).begin() as conn:
        older = [{"v": version_id, "i": i, "t": " ".join(rng.choices(vocab, k=WORDS_PER_LABEL)),
                  "m": "heuristic"} for i in range(0, d_sae, 16)]
        conn.execute(sql, older)
        conn.execute(sql, [{"v": version_id, "i": i,
                            "t": " ".join(rng.choices(vocab, k=WORDS_PER_LABEL)), "m": "human"}
                           for i in range(d_sae)])


def _vocab() -> list[str]:
    rng = random.Random(1)
    return sorted({f"w{i}{''.join(rng.choices('abcdefghij', k=3))}" for i in range(N_VOCAB)})


def build_home(home: Path, d_sae: int, models_from: Path | None) -> tuple[str, list[str]]:
    """The scratch home's catalog; one already built by an earlier run with ``--home`` and
    the same ``--d-sae`` is reused as it is."""
    import torch

    from saereg.registry.catalog.writes import Catalog
    from saereg.registry.sae.folder import save_sae
    from saereg.registry.sae.modules import SAEConfig, build_sae
    from saereg.training.lm import load_lm

    os.environ["SAEREG_HOME"] = str(home)
    done = home / "bench-built.json"
    if done.exists() and json.loads(done.read_text()).get("d_sae") == d_sae:
        print(f"reusing the catalog in {home}")
        return json.loads(done.read_text())["ref"], _vocab()
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    if models_from is not None and not (models / MODEL).exists():
        (models / MODEL).symlink_to((models_from / MODEL).resolve(), target_is_directory=True)
    else:
        load_lm(MODEL)  # converts the packaged GGUF once; the server loads the cached copy
    url = f"sqlite:///{home}/catalog.db"
    cfg = SAEConfig(d_in=D_IN, d_sae=d_sae, architecture="topk", k=32,
                    metadata={"model_name": MODEL, "hook_name": HOOK})
    rates = -torch.rand(d_sae, generator=torch.Generator().manual_seed(0)) * 6
    folder = save_sae(build_sae(cfg, seed=0), home / "sae-src", log_sparsity=rates)
    t0 = time.perf_counter()
    info = Catalog(url).register_folder(folder, "bench-web", model=MODEL, hook=HOOK)
    print(f"registered {info.ref} (d_sae {d_sae}) in {time.perf_counter() - t0:.1f} s")
    vocab = _vocab()
    t0 = time.perf_counter()
    fill_stats(url, info.id, d_sae, vocab)
    fill_labels(url, info.id, d_sae, vocab)
    size = (home / "catalog.db").stat().st_size / 2**20
    print(f"filled stats and labels in {time.perf_counter() - t0:.0f} s (catalog.db {size:.0f} MB)")
    done.write_text(json.dumps({"d_sae": d_sae, "ref": info.ref}))
    return info.ref, vocab


# -- the server ----------------------------------------------------------------------------------

def start_server(home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("saereg")
    env = {**os.environ, "SAEREG_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "serve", "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 180:
        if proc.poll() is not None:
            sys.exit(f"saereg serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/saes", timeout=5).status_code == 200:
                print(f"server answered after {time.perf_counter() - t0:.1f} s")
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    sys.exit(f"saereg serve did not answer in 180 s:\n{log.read_text()[-3000:]}")


SERVER_TIMES: dict[str, list[float]] = {}
"""Server time of every timed GET (the app's ``Server-Timing`` header), by the label given."""


def timed_gets(client, paths: list[str], label: str | None = None) -> list[float]:
    times = []
    for p in paths:
        t = time.perf_counter()
        r = client.get(p)
        times.append(time.perf_counter() - t)
        if r.status_code != 200:
            raise SystemExit(f"GET {p}: {r.status_code} {r.text[:300]}")
        if label:
            dur = r.headers.get("server-timing", "").partition("dur=")[2]
            SERVER_TIMES.setdefault(label, []).append(float(dur) / 1e3)
    return times


def both(label: str, times: list[float]) -> str:
    """Round trip and server time of one row."""
    return f"{label}: {summary(times)}; server {summary(SERVER_TIMES.get(label, []))}"


def stream(client, path: str, body: dict, first: str | None = None) -> tuple[float, float, int]:
    """POST an SSE request; (seconds to the first ``data:`` event whose JSON has key ``first``
    (any event when None), seconds to ``event: done``, data events)."""
    t0 = time.perf_counter()
    t_first, events = None, 0
    with client.stream("POST", path, json=body, timeout=300) as r:
        if r.status_code != 200:
            raise SystemExit(f"POST {path}: {r.status_code} {r.read()[:300]!r}")
        done = False
        for line in r.iter_lines():
            if line.startswith("event:") and line.split(":", 1)[1].strip() == "done":
                done = True
            elif line.startswith("data:") and not done:
                events += 1
                if t_first is None and (first is None or first in json.loads(line[5:])):
                    t_first = time.perf_counter() - t0
        if not done:
            raise SystemExit(f"POST {path}: the stream ended without `event: done`")
    return t_first if t_first is not None else float("nan"), time.perf_counter() - t0, events


def prompt_text(n_tokens: int) -> str:
    from transformers import AutoTokenizer

    from saereg.registry.paths import saereg_home

    tok = AutoTokenizer.from_pretrained(str(saereg_home() / "models" / MODEL))
    words = PROMPT_WORDS.split()
    for k in range(1, len(words) + 1):
        text = " ".join(words[:k])
        if len(tok(text, add_special_tokens=False)["input_ids"]) >= n_tokens:
            return text
    return PROMPT_WORDS


def load_test(base: str, paths: list[str], clients: int, seconds: float) -> None:
    import httpx

    stop = time.perf_counter() + seconds
    times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine, bad = [], []
        with httpx.Client(base_url=base, timeout=30) as c:
            while time.perf_counter() < stop:
                p = rng.choice(paths)
                t = time.perf_counter()
                try:
                    r = c.get(p)
                    if r.status_code != 200:
                        bad.append(f"{p}: {r.status_code}")
                except httpx.HTTPError as e:
                    bad.append(f"{p}: {type(e).__name__} {e}")
                mine.append(time.perf_counter() - t)
        with lock:
            times.extend(mine)
            errors.extend(bad)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    print(f"{clients} clients x {seconds:.0f} s on feature pages: {len(times)} requests "
          f"({len(times) / wall:.0f}/s), {len(errors)} errors, {summary(times)}")
    for e in errors[:5]:
        print(f"  error: {e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-sae", type=int, default=65_536)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--prompt-runs", type=int, default=10)
    p.add_argument("--steer-runs", type=int, default=5)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--models-from", type=Path, default=None)
    p.add_argument("--home", type=Path, default=None,
                   help="build the scratch home here and keep it (reused by the next run)")
    args = p.parse_args()

    import httpx

    with tempfile.TemporaryDirectory(prefix="saereg-webbench-") as tmp:
        home = args.home.resolve() if args.home else Path(tmp) / "home"
        ref, vocab = build_home(home, args.d_sae, args.models_from)
        proc, base = start_server(home, Path(tmp) / "serve.log")
        try:
            rng = random.Random(3)
            with httpx.Client(base_url=base, timeout=60) as c:
                idx = [rng.randrange(args.d_sae) for _ in range(args.requests + 10)]
                timed_gets(c, [f"/sae/{ref}/feature/{i}" for i in idx[:10]])  # warm-up
                rows = [("feature page", [f"/sae/{ref}/feature/{i}" for i in idx[10:]]),
                        ("feature API", [f"/api/sae/{ref}/feature/{i}" for i in idx[10:]])]
                words = [rng.choice(vocab) for _ in range(args.requests)]
                rows += [("search API (1 word)", [f"/api/search?q={w}" for w in words]),
                         ("search page (1 word)", [f"/search?q={w}" for w in words]),
                         ("SAE page", [f"/sae/{ref}"] * 20)]
                for label, paths in rows:
                    print(both(label, timed_gets(c, paths, label)))

                text = prompt_text(20)
                feature = idx[0]
                t = time.perf_counter()
                stream(c, f"/api/sae/{ref}/prompt", {"text": text, "feature": feature, "top": 5})
                print(f"first prompt (loads model and SAE): {time.perf_counter() - t:.2f} s")
                for mode, body in (("feature", {"text": text, "feature": feature, "top": 5}),
                                   ("top", {"text": text, "feature": None, "top": 5})):
                    firsts, totals, n = [], [], 0
                    for _ in range(args.prompt_runs):
                        a, b, n = stream(c, f"/api/sae/{ref}/prompt", body)
                        firsts.append(a)
                        totals.append(b)
                    print(f"prompt ({mode} mode, {n} tokens): first token {summary(firsts)}; "
                          f"done {summary(totals)}")

                steer = {"prompt": "The weather today is", "method": "add", "preset": None,
                         "features": [{"index": feature, "strength": 8.0}],
                         "max_new_tokens": 20, "seed": 0, "temperature": 0.0}
                stream(c, f"/api/sae/{ref}/steer", steer, first="text")  # warm-up
                firsts, totals = [], []
                for _ in range(args.steer_runs):
                    a, b, n = stream(c, f"/api/sae/{ref}/steer", steer, first="text")
                    firsts.append(a)
                    totals.append(b)
                print(f"steer (20 new tokens, default + steered, {n} events): first token "
                      f"{summary(firsts)}; done {summary(totals)}")
            load_test(base, [f"/sae/{ref}/feature/{rng.randrange(args.d_sae)}"
                             for _ in range(2000)], args.clients, args.seconds)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
