"""The analyze pass on the tiny LLaMA, on SQLite and PostgreSQL: the stored top example of a
feature is really where it peaks (recomputed over the same windows, same document and offset),
stored firing rates and means equal a direct recomputation, histogram counts add up to the
firings, dead features are flagged, the logit lens equals W_dec @ W_U^T, a second run never
overwrites the first (also through `saereg analyze`), and bad input (an out-of-range index, a
context longer than the model's) is one clear error with nothing stored."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from saereg.analysis.stats import AnalyzeConfig, analyze, feature_stats
from saereg.commands.main import cli
from saereg.registry.catalog import db
from saereg.registry.errors import UsageError

CTX, TOKENS = 32, 1024


def recompute(ref: str):
    """Activations [N, T, F] over the same windows, the windows, and the keep mask."""
    from saereg.registry.api import get_version, load_sae
    from saereg.training.data import TokenWindows
    from saereg.training.lm import ActivationCapture, load_lm, special_token_mask

    info = get_version(ref)
    lm, sae = load_lm(info.model), load_sae(ref)
    cap = ActivationCapture(lm, [info.hook])
    acts, wins, keeps, n = [], [], [], 0
    for ids, ws in TokenWindows(lm.tokenizer, CTX).batches(8):
        keep = ~special_token_mask(lm.tokenizer, ids)
        with torch.no_grad():
            acts.append(sae.encode(cap(ids)[info.hook]) * keep[..., None])
        wins += ws
        keeps.append(keep)
        n += int(keep.sum())
        if n >= TOKENS:
            break
    return torch.cat(acts), wins, torch.cat(keeps), lm, sae


def test_stored_stats_match_a_recomputation(tiny_sae):
    run_id = analyze(tiny_sae, AnalyzeConfig(tokens=TOKENS, context_size=CTX), progress=False)
    acts, wins, keep, lm, sae = recompute(tiny_sae)
    n_tok = int(keep.sum())
    rates = (acts > 0).sum(dim=(0, 1)).double() / n_tok
    checked = 0
    for f in range(acts.shape[-1]):
        _, run, st = feature_stats(tiny_sae, f)
        assert run.id == run_id and run.tokens == n_tok and run.context_size == CTX
        assert st.firing_rate == pytest.approx(float(rates[f]), rel=1e-9)
        assert sum(st.histogram["counts"]) == int((acts[..., f] > 0).sum())
        if rates[f] == 0:
            assert st.flag == "dead" and st.top_examples == []
            continue
        fired = acts[..., f][acts[..., f] > 0]
        assert st.mean_activation == pytest.approx(float(fired.mean()), rel=1e-4)
        flat = acts[..., f].reshape(-1)
        w, pos = divmod(int(flat.argmax()), CTX)
        top = st.top_examples[0]
        assert top["activation"] == pytest.approx(float(flat.max()), rel=1e-4)
        assert (top["window"], top["position"]) == (w, pos)
        assert top["acts"][top["peak"]] == pytest.approx(float(flat.max()), rel=1e-4)
        assert top["token_ids"][top["peak"]] == int(wins[w].input_ids[pos])
        seg = [s for s in wins[w].starts if s[0] <= pos][-1]
        assert top["doc_id"] == wins[w].doc_ids[seg[1]]
        assert top["doc_offset"] == seg[2] + pos - seg[0]
        assert [e["activation"] for e in st.top_examples] == sorted(
            (e["activation"] for e in st.top_examples), reverse=True)
        assert len(st.top_examples) == min(20, int((acts[..., f].amax(1) > 0).sum()))
        checked += 1
    assert checked > 10
    lens = sae.W_dec.detach() @ lm.model.get_output_embeddings().weight.detach().T
    best = lm.tokenizer.convert_ids_to_tokens(int(lens[3].argmax()))
    assert feature_stats(tiny_sae, 3)[2].top_logits[0][0] == best


def test_runs_accumulate_and_bad_index_is_refused(tiny_sae):
    from sqlalchemy import func, select

    from saereg.registry.catalog.feature_schema import FeatureStats, StatsRun

    first = analyze(tiny_sae, AnalyzeConfig(tokens=256, context_size=CTX), progress=False)
    r = CliRunner().invoke(cli, ["analyze", tiny_sae, "--tokens", "512", "--context-size",
                                 str(CTX)])
    assert r.exit_code == 0 and "stats run" in r.output, r.output
    second = int(r.output.split("stats run ")[1].split()[0])
    assert second > first
    r = CliRunner().invoke(cli, ["analyze", tiny_sae, "--context-size", "100000000"])
    assert r.exit_code == 2 and "context_size" in r.output
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(StatsRun)) == 2
        assert s.scalar(select(func.count()).select_from(FeatureStats)) == 2 * 96
    assert feature_stats(tiny_sae, 0)[1].id == second
    assert feature_stats(tiny_sae, 0, run_id=first)[1].tokens < 512
    with pytest.raises(UsageError, match="out of range"):
        feature_stats(tiny_sae, 96)
