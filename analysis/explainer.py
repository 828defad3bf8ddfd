"""LLM labels through any OpenAI-compatible chat-completions endpoint, with a detection score.

The endpoint and model come from ``SAEREG_LLM_URL`` (base URL, e.g. ``http://host/v1``) and
``SAEREG_LLM_MODEL``; ``SAEREG_LLM_API_KEY`` is sent as a bearer token and never logged or
stored. The explainer shows the model a feature's top examples (the peak token marked
``<<like this>>``) and its top logit tokens and asks for a short label. The detection score
asks, for a shuffled mix of the feature's top examples and as many top examples of other
features (windows outside this feature's top list), whether each one matches the label (answer: one
0/1 per line); the score is the balanced accuracy, stored with the label.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from saereg.analysis.tokens import display_token
from saereg.registry.errors import ConfigError, SaeRegError, redact

SYSTEM = ("You label features of a sparse autoencoder trained on a language model. Answer "
          "with the requested format only.")


@dataclass(frozen=True)
class LLMConfig:
    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0

    def __repr__(self) -> str:  # the key never shows, nor credentials inside the URL
        key = ", api_key='***'" if self.api_key else ""
        return (f"LLMConfig(url={redact(self.url, self.api_key)!r}, model={self.model!r}{key}, "
                f"timeout={self.timeout!r})")

    @property
    def shown_url(self) -> str:
        """The endpoint as messages show it (no key, no credentials)."""
        return redact(self.url, self.api_key)

    @classmethod
    def from_env(cls) -> LLMConfig:
        url, model = os.environ.get("SAEREG_LLM_URL"), os.environ.get("SAEREG_LLM_MODEL")
        if not url or not model:
            raise ConfigError("set SAEREG_LLM_URL (an OpenAI-compatible base URL) and "
                              "SAEREG_LLM_MODEL to use the LLM explainer")
        return cls(url.rstrip("/"), model, os.environ.get("SAEREG_LLM_API_KEY"))


def chat(cfg: LLMConfig, prompt: str) -> str:
    body = json.dumps({"model": cfg.model, "temperature": 0, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    req = urllib.request.Request(f"{cfg.url}/chat/completions", body, headers)
    try:
        with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
            data = json.loads(resp.read())
        return str(data["choices"][0]["message"]["content"]).strip()
    except urllib.error.HTTPError as e:
        raise SaeRegError(f"LLM endpoint {cfg.shown_url} answered HTTP {e.code}") from None
    except urllib.error.URLError as e:
        raise SaeRegError(f"LLM endpoint {cfg.shown_url} failed: "
                          f"{redact(e.reason, cfg.api_key)}") from None
    except (OSError, KeyError, IndexError, ValueError) as e:
        raise SaeRegError(f"LLM endpoint {cfg.shown_url} failed: {type(e).__name__}") from None


def _show(ex: dict, mark: bool) -> str:
    toks = [display_token(t) for t in ex["tokens"]]
    if mark:
        toks[ex["peak"]] = f"<<{toks[ex['peak']]}>>"
    return "".join(toks)


def explain_prompt_text(top_examples: list[dict], top_logits: list) -> str:
    lines = [f"{i + 1}. {_show(e, True)}" for i, e in enumerate(top_examples[:10])]
    promotes = ", ".join(repr(display_token(t)) for t, _ in top_logits[:10])
    return ("Texts where the feature fires most (the strongest token is marked <<like this>>):\n"
            + "\n".join(lines) + f"\nTokens it promotes: {promotes}\n"
            "Reply with a label of at most 8 words.")


def detection_score(cfg: LLMConfig, label: str, positives: list[dict], negatives: list[dict],
                    seed: int = 0) -> float | None:
    """Balanced accuracy of the LLM telling ``positives`` from ``negatives`` by ``label``;
    None (no score) when either side has no example."""
    n = min(len(positives), len(negatives))
    if n == 0:
        return None
    mix = [(e, 1) for e in positives[:n]] + [(e, 0) for e in negatives[:n]]
    random.Random(seed).shuffle(mix)
    prompt = (f"Feature label: {label}\nFor each text below answer 1 if the feature described "
              "by the label is present in it, else 0; one digit per line, nothing else.\n"
              + "\n".join(f"{i + 1}. {_show(e, False)}" for i, (e, _) in enumerate(mix)))
    answers = [c for c in chat(cfg, prompt) if c in "01"]
    if len(answers) != len(mix):
        raise SaeRegError(f"the LLM gave {len(answers)} answers for {len(mix)} texts")
    tp = sum(1 for (_, y), a in zip(mix, answers) if y == 1 and a == "1")
    tn = sum(1 for (_, y), a in zip(mix, answers) if y == 0 and a == "0")
    return (tp / n + tn / n) / 2


def label_llm(ref: str, indices: list[int], *, cfg: LLMConfig | None = None,
              database_url: str | None = None):
    """Label ``indices`` of ``ref`` with the LLM from the latest stats run; each label stores
    its detection score. Returns the new labels."""
    from sqlalchemy import select

    from saereg.analysis.labels import add_labels
    from saereg.analysis.stats import check_index, latest_run_id
    from saereg.registry.api import get_version
    from saereg.registry.catalog import db
    from saereg.registry.catalog.feature_schema import FeatureStats
    from saereg.registry.errors import UsageError

    cfg = cfg or LLMConfig.from_env()
    info = get_version(ref, database_url=database_url)
    for i in indices:
        check_index(info, i)
    with db.session(database_url) as s:
        run_id = latest_run_id(s, info.id)
        if run_id is None:
            raise UsageError(f"{info.ref} has no stats run yet; run `saereg analyze {info.ref}`")
        rows = {r.feature_index: r for r in s.scalars(select(FeatureStats).where(
            FeatureStats.stats_run_id == run_id)).all()}
    labels, scores = [], {}
    for i in indices:
        st = rows[i]
        if not st.top_examples:
            continue
        answer = chat(cfg, explain_prompt_text(st.top_examples, st.top_logits))
        # its first line, without the control characters a label may not hold
        text = re.sub(r"[\x00-\x1f\x7f-\x9f]", "", (answer.splitlines() or [""])[0])
        mine = {e["window"] for e in st.top_examples}
        negatives = [e for j, r in sorted(rows.items()) if j != i
                     for e in r.top_examples[:1] if e["window"] not in mine]
        random.Random(i).shuffle(negatives)
        scores[i] = detection_score(cfg, text, st.top_examples[:5], negatives[:5], seed=i)
        labels.append((i, text))
    return add_labels(info.ref, labels, method="llm", model=cfg.model, stats_run_id=run_id,
                      scores=scores, database_url=database_url)
