"""How an exception becomes an HTTP status and one line for the client (never a traceback)."""

from __future__ import annotations

import logging

from saereg.registry.errors import (CatalogBusyError, NotFoundError, SaeRegError, UsageError,
                                    redact)

log = logging.getLogger("saereg.web")


def describe(exc: BaseException) -> tuple[int, str]:
    """(status, message): 404 for an unknown thing, 422 for bad input, 503 when the catalog or
    a model stayed busy, 500 otherwise (the traceback goes to the server's log only)."""
    from saereg.analysis.web.warm import ModelBusyError

    if isinstance(exc, NotFoundError):
        return 404, redact(exc)
    if isinstance(exc, UsageError):
        return 422, redact(exc)
    if isinstance(exc, (CatalogBusyError, ModelBusyError)):
        return 503, redact(exc)
    if isinstance(exc, SaeRegError):
        return 500, redact(exc)
    log.error("unexpected error", exc_info=exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return 500, redact(f"internal error ({type(exc).__name__}: {first}); see the server's log")
