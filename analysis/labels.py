"""Feature labels: append-only history with provenance, and the offline heuristic labeller.

Every label row records its text, author, method (human, heuristic, llm), the labelling model
(for machine labels), time, status (candidate, accepted, rejected) and the label it
supersedes (the previous label of the same feature by the same method), and its sentence
embedding in the same transaction (see :mod:`saereg.analysis.embed`). Nothing is overwritten:
relabelling adds a row; only a row's status may change later. A feature's *current* label is
its newest accepted label, else its newest candidate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from saereg.analysis.embed import EMBED_DIM, EMBED_MODEL, progress_line, vectors_for
from saereg.analysis.tokens import display_token
from saereg.registry.catalog import db
from saereg.registry.catalog.feature_schema import (LABEL_METHODS, LABEL_STATUSES,
                                                    FeatureLabel, label_text_problem,
                                                    LabelEmbedding, current_label)
from saereg.registry.errors import NotFoundError, UsageError

HEURISTIC_MODEL = "saereg-heuristic-v1"


@dataclass(frozen=True)
class LabelInfo:
    id: int
    feature_index: int
    text: str
    method: str
    model: str | None
    status: str
    author: str
    created_at: datetime
    supersedes: int | None
    detection_score: float | None


def _info(row: FeatureLabel) -> LabelInfo:
    return LabelInfo(row.id, row.feature_index, row.text, row.method, row.model, row.status,
                     row.created_by, row.created_at, row.supersedes_id, row.detection_score)


def _check(text: str, method: str, status: str) -> str:
    text = " ".join((text or "").split())
    problem = label_text_problem(text)
    if problem:
        raise UsageError(problem)
    if method not in LABEL_METHODS:
        raise UsageError(f"method must be one of {', '.join(LABEL_METHODS)}, got {method!r}")
    if status not in LABEL_STATUSES:
        raise UsageError(f"status must be one of {', '.join(LABEL_STATUSES)}, got {status!r}")
    return text


def add_labels(ref: str, labels: list[tuple[int, str]], *, method: str = "human",
               model: str | None = None, status: str = "candidate", author: str | None = None,
               stats_run_id: int | None = None, scores: dict[int, float] | None = None,
               database_url: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> list[LabelInfo]:
    """Append labels ``(feature index, text)`` to features of ``ref`` in one transaction;
    ``progress(done, total)`` follows the labels' embedding, the long part."""
    from saereg.analysis.stats import check_index
    from saereg.registry.api import get_version
    from saereg.registry.catalog.rows import current_user

    info = get_version(ref, database_url=database_url)
    checked = []
    for index, text in labels:
        check_index(info, index)
        checked.append((index, _check(text, method, status)))
    if method != "human" and not model:
        raise UsageError(f"a {method} label needs the model that made it")
    user = author or current_user()
    vectors = vectors_for([t for _, t in checked], progress)  # None without the model

    def write() -> list[LabelInfo]:
        with db.session(database_url, write=True) as s:
            prev = dict(s.execute(
                select(FeatureLabel.feature_index, FeatureLabel.id)
                .where(FeatureLabel.version_id == info.id, FeatureLabel.method == method)
                .order_by(FeatureLabel.id)).all())
            rows = [FeatureLabel(version_id=info.id, feature_index=i, text=t, method=method,
                                 model=model, status=status, supersedes_id=prev.get(i),
                                 stats_run_id=stats_run_id, created_by=user,
                                 detection_score=(scores or {}).get(i))
                    for i, t in checked]
            s.add_all(rows)
            s.flush()
            if vectors is not None:  # the label and its embedding commit together
                s.add_all(LabelEmbedding(label_id=r.id, model=EMBED_MODEL, dim=EMBED_DIM,
                                         vector=v) for r, v in zip(rows, vectors))
            return [_info(r) for r in rows]

    return db.retrying(write, what="adding labels")


def add_label(ref: str, index: int, text: str, **kw) -> LabelInfo:
    """Append one label (see :func:`add_labels`)."""
    return add_labels(ref, [(index, text)], **kw)[0]


def set_status(label_id: int, status: str, *, database_url: str | None = None) -> LabelInfo:
    if status not in LABEL_STATUSES:
        raise UsageError(f"status must be one of {', '.join(LABEL_STATUSES)}, got {status!r}")

    def write() -> LabelInfo:
        with db.session(database_url, write=True) as s:
            row = s.get(FeatureLabel, label_id)
            if row is None:
                raise NotFoundError("label", str(label_id))
            row.status = status
            s.flush()
            return _info(row)

    return db.retrying(write, what="setting a label's status")


def history(ref: str, index: int, *, database_url: str | None = None) -> list[LabelInfo]:
    """Every label of one feature, oldest first."""
    from saereg.analysis.stats import check_index
    from saereg.registry.api import get_version

    info = get_version(ref, database_url=database_url)
    check_index(info, index)
    with db.session(database_url) as s:
        rows = s.scalars(select(FeatureLabel).where(
            FeatureLabel.version_id == info.id, FeatureLabel.feature_index == index)
            .order_by(FeatureLabel.id)).all()
        return [_info(r) for r in rows]


def current(labels: list[LabelInfo]) -> LabelInfo | None:
    return current_label(labels, lambda lab: lab.status)


def _clean(token: str) -> str:
    text = display_token(token).strip()
    return text or repr(token)


def heuristic_text(top_examples: list[dict], top_logits: list) -> str | None:
    """A label from the tokens a feature peaks on and the tokens it promotes; None if dead."""
    if not top_examples:
        return None
    peaks = Counter(_clean(e["tokens"][e["peak"]]) for e in top_examples)
    fires = ", ".join(f"'{t}'" for t, _ in peaks.most_common(4))
    promotes = ", ".join(f"'{_clean(t)}'" for t, _ in top_logits[:4])
    return f"fires on {fires}; promotes {promotes}"


def label_heuristic(ref: str, *, database_url: str | None = None,
                    progress: bool = False) -> list[LabelInfo]:
    """Label every live feature of ``ref`` from its latest stats run (offline, no model);
    with ``progress``, a line on stderr every few seconds while the labels are embedded."""
    from saereg.analysis.stats import latest_run_id
    from saereg.registry.api import get_version
    from saereg.registry.catalog.feature_schema import FeatureStats

    info = get_version(ref, database_url=database_url)
    with db.session(database_url) as s:
        run_id = latest_run_id(s, info.id)
        if run_id is None:
            raise UsageError(f"{info.ref} has no stats run yet; run `saereg analyze {info.ref}`")
        rows = s.execute(select(FeatureStats.feature_index, FeatureStats.top_examples,
                                FeatureStats.top_logits)
                         .where(FeatureStats.stats_run_id == run_id)
                         .order_by(FeatureStats.feature_index)).all()
    labels = [(i, t) for i, ex, lg in rows if (t := heuristic_text(ex, lg))]
    return add_labels(info.ref, labels, method="heuristic", model=HEURISTIC_MODEL,
                      stats_run_id=run_id, database_url=database_url,
                      progress=progress_line() if progress else None)
