"""The feature catalog on the packaged SmolLM2-135M (slow; SQLite): an SAE on model.layers.3
is analyzed over real text; the stored top example of a feature is where it really peaks and
stored firing rates equal a direct recomputation; a label is found by search; steering along
a feature's decoder direction raises the probability of its top logit-lens token."""

from __future__ import annotations

import pytest
import torch

from saereg.analysis.labels import add_label
from saereg.analysis.search import search_labels
from saereg.analysis.stats import AnalyzeConfig, analyze, feature_stats
from saereg.analysis.steering import apply_preset, create_preset, get_preset

pytestmark = pytest.mark.slow
HOOK, CTX, TOKENS = "model.layers.3", 64, 1024


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_catalog_on_smollm2(backend, smollm2, tmp_path):
    from saereg.registry.api import load_sae, register_from_folder
    from saereg.registry.sae.folder import save_sae
    from saereg.registry.sae.modules import SAEConfig, build_sae
    from saereg.training.data import TokenWindows
    from saereg.training.lm import ActivationCapture, load_lm, special_token_mask

    lm = load_lm(smollm2)
    cfg = SAEConfig(d_in=576, d_sae=256, architecture="topk", k=16,
                    metadata={"model_name": lm.name, "hook_name": HOOK})
    folder = save_sae(build_sae(cfg, seed=0), tmp_path / "sae", overwrite=True)
    ref = register_from_folder(folder, "smol-l3", model=lm.name, hook=HOOK).ref
    analyze(ref, AnalyzeConfig(tokens=TOKENS, context_size=CTX), progress=False)

    sae, cap = load_sae(ref), ActivationCapture(lm, [HOOK])
    acts, n = [], 0
    for ids, _ in TokenWindows(lm.tokenizer, CTX).batches(8):
        keep = ~special_token_mask(lm.tokenizer, ids)
        with torch.no_grad():
            acts.append(sae.encode(cap(ids)[HOOK]) * keep[..., None])
        n += int(keep.sum())
        if n >= TOKENS:
            break
    acts = torch.cat(acts)
    rates = (acts > 0).sum(dim=(0, 1)).double() / n
    live = [f for f in range(256) if rates[f] > 0]
    for f in live[:40]:
        st = feature_stats(ref, f)[2]
        assert st.firing_rate == pytest.approx(float(rates[f]), rel=1e-9)
        flat = acts[..., f].reshape(-1)
        w, pos = divmod(int(flat.argmax()), CTX)
        top = st.top_examples[0]
        assert (top["window"], top["position"]) == (w, pos)
        assert top["activation"] == pytest.approx(float(flat.max()), rel=1e-3)

    add_label(ref, live[0], "wormhole physics vocabulary")
    assert [(h.ref, h.feature_index) for h in search_labels("wormhole")] == [(ref, live[0])]

    f = live[0]
    target = int((sae.W_dec[f].detach() @ lm.model.get_output_embeddings().weight.T).argmax())
    create_preset("smol", ref, [(None, f, 200.0)])
    ids = lm.tokenizer("Should I travel by plane or by", return_tensors="pt")["input_ids"]

    def prob() -> float:
        with torch.no_grad():
            return float(lm.model(ids).logits[0, -1].softmax(-1)[target])

    base = prob()
    with apply_preset(lm, get_preset("smol")):
        steered = prob()
    assert steered > base * 10
