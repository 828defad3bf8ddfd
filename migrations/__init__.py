"""Alembic migrations of the catalog schema (``env.py`` + ``versions/``).

Loaded programmatically by :mod:`saereg.registry.catalog.migrate` (no alembic.ini needed); this package's
folder is the script location.
"""
