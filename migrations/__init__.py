"""Alembic migrations of the catalog schema (``env.py`` + ``versions/``).

Loaded programmatically by :mod:`registry.migrate` (no alembic.ini needed); this package's
folder is the script location.
"""
