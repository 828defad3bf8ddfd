"""The label each feature goes by now, looked up in the catalog: the rule is
:func:`saereg.registry.catalog.feature_schema.current_label` (newest accepted, else newest
candidate); these functions fetch the rows it is applied to, for word and meaning search, the
web app, neighbours and prompts.
"""

from __future__ import annotations

from saereg.registry.catalog import db


def current_labels(version_id: int, indices: list[int],
                   database_url: str | None = None) -> dict[int, str]:
    """Current label text per feature index (newest accepted, else newest candidate)."""
    return {i: lab.text for i, lab in current_rows(version_id, indices, database_url).items()}


def current_rows(version_id: int, indices: list[int], database_url: str | None):
    """The current label row (id, feature_index, text, method, status) per feature index of
    ``indices`` that has one."""
    found = current_rows_of({version_id: set(indices)}, database_url)
    return {i: lab for (_, i), lab in found.items()}


def current_rows_of(wanted: dict[int, set[int]], database_url: str | None,
                     conn=None) -> dict:
    """The current label row (id, feature_index, text, method, status) per (version id,
    feature index) of ``wanted`` (feature indices per version) that has one, in one query
    (on the connection ``conn`` when given)."""
    from sqlalchemy import and_, or_, select

    from saereg.registry.catalog.feature_schema import FeatureLabel, current_label

    wanted = {v: indices for v, indices in wanted.items() if indices}
    if not wanted:
        return {}
    stmt = (select(FeatureLabel.id, FeatureLabel.version_id, FeatureLabel.feature_index,
                   FeatureLabel.text, FeatureLabel.method, FeatureLabel.status)
            .where(or_(*(and_(FeatureLabel.version_id == v,
                              FeatureLabel.feature_index.in_(sorted(indices)))
                         for v, indices in wanted.items())),
                   FeatureLabel.status != "rejected"))
    if conn is not None:
        rows = conn.execute(stmt).all()
    else:
        with db.session(database_url) as s:
            rows = s.execute(stmt).all()
    by_feature: dict[tuple[int, int], list] = {}
    # oldest first, sorted here: ORDER BY id can make SQLite read whole versions through the
    # (version_id, id) index instead of looking the features up
    for row in sorted(rows, key=lambda r: r.id):
        by_feature.setdefault((row.version_id, row.feature_index), []).append(row)
    return {key: current_label(h, lambda r: r.status) for key, h in by_feature.items()}
