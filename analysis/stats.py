"""One streaming pass over text that studies every feature of an SAE version.

For each feature: firing rate (over non-special tokens), mean activation when firing, max
activation, a histogram of non-zero activations on fixed log10 bins, the top activating
examples (a token window around the peak, per-token activations, and the document and token
offset the peak came from), examples sampled uniformly from the windows where the feature fires
(grouped by activation interval at the end), and the logit lens (W_dec @ W_U^T, top and bottom
tokens). The model forward stops at the hook; top-k is a running merge of each batch's
per-window maxima. Everything is stored as one immutable stats run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from saereg.registry.catalog import db
from saereg.registry.errors import ConfigError, NotFoundError, UsageError
from saereg.training.corpus import dataset_name

HIST_LO, HIST_HI, HIST_BINS = -4.0, 4.0, 40  # log10(activation) bins
LEFT, RIGHT = 12, 4  # tokens kept before / after an example's peak
DENSE_RATE = 0.1


@dataclass
class AnalyzeConfig:
    dataset: str | None = None
    """Dataset for TokenWindows (None: the offline default corpus)."""
    tokens: int = 65536
    """Stop after this many tokens (whole windows)."""
    context_size: int = 128
    batch_size: int = 8
    top_k: int = 20
    """Top activating examples kept per feature."""
    samples: int = 24
    """Random firing windows kept per feature for interval examples."""
    logits: int = 10
    dense_rate: float = DENSE_RATE
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.context_size < 2 or self.batch_size < 1 or self.top_k < 1:
            raise ConfigError("tokens, batch_size and top_k must be positive and context_size >= 2")
        if self.context_size > 100_000:
            raise ConfigError(f"context_size {self.context_size} is too large")


def code_version() -> str:
    """Package version plus a hash of this module's source: what produced a stats run."""
    try:
        ver = importlib.metadata.version("sae-registry")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        ver = "0"
    src = inspect.getsource(inspect.getmodule(code_version))
    return f"{ver}+{hashlib.sha256(src.encode()).hexdigest()[:12]}"


class _Keeper:
    """Per-feature running top-k of windows by a score, with the token/activation slice
    around each window's peak."""

    def __init__(self, k: int, n_features: int, width: int):
        self.score = torch.full((k, n_features), float("-inf"))
        self.window = torch.full((k, n_features), -1, dtype=torch.long)
        self.pos = torch.zeros((k, n_features), dtype=torch.long)
        self.peak = torch.zeros((k, n_features))
        self.ids = torch.zeros((k, n_features, width), dtype=torch.long)
        self.acts = torch.zeros((k, n_features, width))
        self.start = torch.zeros((k, n_features), dtype=torch.long)

    def merge(self, score, window, pos, peak, ids, acts, start) -> None:
        k = self.score.shape[0]
        allscore = torch.cat([self.score, score])
        top, idx = allscore.topk(k, dim=0)
        for name, new in (("window", window), ("pos", pos), ("peak", peak), ("start", start)):
            setattr(self, name, torch.cat([getattr(self, name), new]).gather(0, idx))
        w = self.ids.shape[-1]
        big = idx[..., None].expand(-1, -1, w)
        self.ids = torch.cat([self.ids, ids]).gather(0, big)
        self.acts = torch.cat([self.acts, acts]).gather(0, big)
        self.score = top


class FeatureAccumulator:
    """Streaming per-feature statistics; ``update`` takes one batch of activations."""

    def __init__(self, n_features: int, cfg: AnalyzeConfig):
        self.cfg, self.n = cfg, n_features
        self.tokens = 0
        self.fires = torch.zeros(n_features, dtype=torch.long)
        self.sums = torch.zeros(n_features, dtype=torch.float64)
        self.hist = torch.zeros(n_features * HIST_BINS, dtype=torch.long)
        width = LEFT + 1 + RIGHT
        self.top = _Keeper(cfg.top_k, n_features, width)
        self.sampled = _Keeper(cfg.samples, n_features, width)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.windows_seen = 0

    def update(self, acts: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> None:
        """``acts`` [B, T, F] (zeroed where ``keep`` is False), ``ids`` [B, T], ``keep`` [B, T]."""
        acts = acts.float().cpu() * keep[..., None]
        ids = ids.cpu()
        b, t, f = acts.shape
        self.tokens += int(keep.sum())
        nz = acts > 0
        self.fires += nz.sum(dim=(0, 1))
        self.sums += acts.sum(dim=(0, 1), dtype=torch.float64)
        rows, cols = nz.reshape(-1, f).nonzero(as_tuple=True)
        if rows.numel():
            vals = acts.reshape(-1, f)[rows, cols]
            bins = ((vals.log10() - HIST_LO) / (HIST_HI - HIST_LO) * HIST_BINS).long()
            self.hist += torch.bincount(cols * HIST_BINS + bins.clamp(0, HIST_BINS - 1),
                                        minlength=f * HIST_BINS)
        wmax, wpos = acts.max(dim=1)  # [B, F]
        window = torch.arange(self.windows_seen, self.windows_seen + b)[:, None].expand(b, f)
        self.windows_seen += b
        start = (wpos - LEFT).clamp(min=0)
        idx = (wpos[..., None] + torch.arange(-LEFT, RIGHT + 1)).clamp(0, t - 1)  # [B, F, W]
        sl_acts = acts.permute(0, 2, 1).gather(2, idx)
        sl_ids = ids[:, None, :].expand(b, f, t).gather(2, idx)
        fired = wmax > 0
        score = torch.where(fired, wmax, torch.tensor(float("-inf")))
        self.top.merge(score, window, wpos, wmax, sl_ids, sl_acts, start)
        rnd = torch.rand((b, f), generator=self.gen)
        self.sampled.merge(torch.where(fired, rnd, torch.tensor(float("-inf"))),
                           window, wpos, wmax, sl_ids, sl_acts, start)


def logit_lens(w_dec: torch.Tensor, unembed: torch.Tensor, k: int, chunk: int = 1024):
    """Top and bottom ``k`` (token id, value) per feature of ``w_dec @ unembed.T``."""
    tops, bottoms = [], []
    for i in range(0, w_dec.shape[0], chunk):
        logits = w_dec[i:i + chunk].float() @ unembed.float().T
        tv, ti = logits.topk(k, dim=1)
        bv, bi = logits.topk(k, dim=1, largest=False)
        tops.append((tv, ti))
        bottoms.append((bv, bi))
    return (torch.cat([v for v, _ in tops]), torch.cat([i for _, i in tops]),
            torch.cat([v for v, _ in bottoms]), torch.cat([i for _, i in bottoms]))


def _examples(keeper: _Keeper, f: int, windows: list, tok, rank: int) -> dict | None:
    if keeper.window[rank, f] < 0 or keeper.score[rank, f] == float("-inf"):
        return None
    w, pos = int(keeper.window[rank, f]), int(keeper.pos[rank, f])
    start = int(keeper.start[rank, f])
    n = min(LEFT + 1 + RIGHT, pos + RIGHT + 1 - start)
    off = start - (pos - LEFT)  # slice index of `start`
    ids = keeper.ids[rank, f, off:off + n].tolist()
    doc, offset = provenance(windows[w], pos)
    return {"activation": float(keeper.peak[rank, f]), "window": w, "position": pos,
            "peak": pos - start, "tokens": [tok.convert_ids_to_tokens(i) for i in ids],
            "token_ids": ids, "acts": [round(float(a), 5) for a in keeper.acts[rank, f, off:off + n]],
            "doc_id": doc, "doc_offset": offset}


def provenance(window, pos: int) -> tuple[str | None, int | None]:
    """(document id, token offset in that document) of position ``pos`` in a Window."""
    best = None
    for seg_pos, doc_index, offset in window.starts:
        if seg_pos <= pos:
            best = (window.doc_ids[doc_index], offset + pos - seg_pos)
    return best if best else (None, None)


def analyze(ref: str, cfg: AnalyzeConfig | None = None, *, progress: bool = True,
            database_url: str | None = None) -> int:
    """Run the analyze pass for ``ref`` and store it as a new stats run; returns its id."""
    from saereg.analysis.lm import load_model
    from saereg.registry.api import get_version, load_sae
    from saereg.training.data import TokenWindows
    from saereg.training.lm import ActivationCapture, special_token_mask

    cfg = cfg or AnalyzeConfig()
    info = get_version(ref, database_url=database_url)
    sae = load_sae(ref, database_url=database_url)
    lm = load_model(info.model)
    if cfg.context_size > lm.context_limit:
        raise UsageError(f"context_size {cfg.context_size} exceeds the model's limit "
                         f"{lm.context_limit}")
    capture = ActivationCapture(lm, [info.hook], early_stop=True)
    windows_src = TokenWindows(lm.tokenizer, cfg.context_size, dataset=cfg.dataset)
    acc = FeatureAccumulator(info.d_sae, cfg)
    windows: list = []
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.tokens, unit="tok", desc=f"analyze {info.ref}", disable=not progress)
    with torch.no_grad():
        for ids, batch_windows in windows_src.batches(cfg.batch_size):
            x = capture(ids)[info.hook]
            acts = sae.encode(x.to(sae.W_enc.dtype))
            keep = ~special_token_mask(lm.tokenizer, ids)
            acc.update(acts, ids, keep)
            windows.extend(batch_windows)
            bar.update(ids.numel())
            if acc.tokens >= cfg.tokens:
                break
    bar.close()
    if acc.tokens == 0:
        raise UsageError(f"dataset {cfg.dataset or 'default'} gave no complete window of "
                         f"{cfg.context_size} tokens; nothing stored")
    unembed = lm.model.get_output_embeddings().weight.detach()
    lens = logit_lens(sae.W_dec.detach(), unembed, cfg.logits)
    rows = build_rows(acc, windows, lm.tokenizer, lens)
    return store_run(info, cfg, acc.tokens, rows, database_url=database_url)


def build_rows(acc: FeatureAccumulator, windows: list, tok, lens) -> list[dict]:
    tv, ti, bv, bi = lens
    rates = (acc.fires.double() / max(acc.tokens, 1)).tolist()
    means = (acc.sums / acc.fires.clamp(min=1)).tolist()
    hist = acc.hist.reshape(acc.n, HIST_BINS).tolist()
    rows = []
    for f in range(acc.n):
        top = [e for r in range(acc.top.score.shape[0])
               if (e := _examples(acc.top, f, windows, tok, r))]
        sampled = [e for r in range(acc.sampled.score.shape[0])
                   if (e := _examples(acc.sampled, f, windows, tok, r))]
        peak = top[0]["activation"] if top else 0.0
        intervals = []
        for j in range(4):  # quarters of [0, max]
            lo, hi = peak * j / 4, peak * (j + 1) / 4
            got = [e for e in sampled if lo < e["activation"] <= hi][:3]
            intervals.append({"low": lo, "high": hi, "examples": got})
        flag = "dead" if acc.fires[f] == 0 else ("dense" if rates[f] > acc.cfg.dense_rate else None)
        rows.append({
            "feature_index": f, "firing_rate": rates[f], "mean_activation": means[f],
            "max_activation": peak, "flag": flag,
            "histogram": {"log10_low": HIST_LO, "log10_high": HIST_HI, "counts": hist[f]},
            "top_examples": top, "interval_examples": intervals,
            "top_logits": [[tok.convert_ids_to_tokens(int(i)), round(float(v), 5)]
                           for v, i in zip(tv[f], ti[f])],
            "bottom_logits": [[tok.convert_ids_to_tokens(int(i)), round(float(v), 5)]
                              for v, i in zip(bv[f], bi[f])]})
    return rows


def store_run(info, cfg: AnalyzeConfig, tokens: int, rows: list[dict], *,
              database_url: str | None = None) -> int:
    from saereg.registry.catalog.feature_schema import FeatureStats, StatsRun
    from saereg.registry.catalog.rows import current_user

    def write() -> int:
        with db.session(database_url, write=True) as s:
            run = StatsRun(version_id=info.id, dataset=dataset_name(cfg.dataset),
                           tokens=tokens, context_size=cfg.context_size,
                           code_version=code_version(), created_by=current_user(),
                           params={"batch_size": cfg.batch_size, "top_k": cfg.top_k,
                                   "samples": cfg.samples, "seed": cfg.seed,
                                   "dense_rate": cfg.dense_rate, "hook": info.hook,
                                   "model": info.model, **cfg.params})
            s.add(run)
            s.flush()
            s.bulk_insert_mappings(FeatureStats, [{"stats_run_id": run.id, **r} for r in rows])
            return run.id

    return db.retrying(write, what="storing a stats run")


def latest_run_id(s, version_id: int) -> int | None:
    from sqlalchemy import func, select

    from saereg.registry.catalog.feature_schema import StatsRun

    return s.scalar(select(func.max(StatsRun.id)).where(StatsRun.version_id == version_id))


def feature_stats(ref: str, index: int, *, run_id: int | None = None,
                  database_url: str | None = None):
    """(VersionInfo, StatsRun or None, FeatureStats or None) for one feature; checks the index."""
    from saereg.registry.api import get_version
    from saereg.registry.catalog.feature_schema import FeatureStats, StatsRun

    info = get_version(ref, database_url=database_url)
    check_index(info, index)
    with db.session(database_url) as s:
        rid = run_id or latest_run_id(s, info.id)
        if rid is None:
            return info, None, None
        run = s.get(StatsRun, rid)
        if run is None or run.version_id != info.id:
            raise NotFoundError("stats run", str(rid), hint=f"for {info.ref}")
        return info, run, s.get(FeatureStats, (rid, index))


def check_index(info, index: int) -> None:
    if not 0 <= index < info.d_sae:
        raise UsageError(f"feature index {index} is out of range for {info.ref} "
                         f"(d_sae {info.d_sae}: 0..{info.d_sae - 1})")
