"""Features on a prompt: the strongest features of an SAE at every token of a text, each with
its current label (``saereg explain-prompt``).
"""

from __future__ import annotations

from dataclasses import dataclass

from saereg.analysis.current import current_labels
from saereg.registry.errors import UsageError


@dataclass(frozen=True)
class TokenFeatures:
    token: str
    position: int
    features: list[tuple[int, float, str | None]]  # (index, activation, current label)


def explain_prompt(prompt: str, ref: str, *, top: int = 5,
                   database_url: str | None = None) -> list[TokenFeatures]:
    """The ``top`` features per token of ``prompt`` with their current labels."""
    import torch

    from saereg.analysis.lm import load_model
    from saereg.registry.api import get_version, load_sae
    from saereg.training.lm import ActivationCapture

    if not prompt or not prompt.strip():
        raise UsageError("explain-prompt needs a non-empty prompt")
    info = get_version(ref, database_url=database_url)
    lm = load_model(info.model)
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] > lm.context_limit:
        raise UsageError(f"the prompt is {ids.shape[1]} tokens, longer than the model's context "
                         f"({lm.context_limit})")
    sae = load_sae(info.ref, database_url=database_url)
    with torch.no_grad():
        acts = sae.encode(ActivationCapture(lm, [info.hook])(ids)[info.hook])[0]
    vals, idx = acts.topk(min(top, acts.shape[-1]), dim=-1)
    labels = current_labels(info.id, sorted(set(idx[vals > 0].tolist())), database_url)
    out = []
    for pos, tok in enumerate(lm.tokenizer.convert_ids_to_tokens(ids[0].tolist())):
        feats = [(int(i), float(v), labels.get(int(i))) for v, i in zip(vals[pos], idx[pos])
                 if v > 0]
        out.append(TokenFeatures(tok, pos, feats))
    return out
