"""User-facing exception types.

The library raises these; only the CLI turns them into exit codes (``UsageError`` family
-> exit 2, everything else -> exit 1). Messages name the thing to fix and never carry a
secret.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit

MASK = "***"

# scheme://user:password@host -> scheme://user:***@host; scheme://token@host -> scheme://***@host
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#@\s:]*)(:[^/?#\s]*)?@"
                       r"(?=[^/?#\s@]*(?:[/?#\s]|$))")
# ?token=..., &key=..., &api_key=..., X-Amz-Signature=... in URLs; api_key=..., access_token=...,
# password=..., token=... anywhere (a bare ``key=`` only in a URL: "KEY=VALUE" is ordinary text)
_SECRET_NAME = r"[A-Za-z0-9_.-]*?(?:token|key|password|passwd|secret|signature|sig|credentials?)"
_SECRET_VALUE = r"(?!\*\*\*)[^&\s#'\"<>,;)]+"
_QUERY_SECRET = re.compile(rf"(?<=[?&;])({_SECRET_NAME}=){_SECRET_VALUE}", re.IGNORECASE)
_TEXT_SECRET = re.compile(rf"(?<![A-Za-z0-9_.])(?!key=)({_SECRET_NAME}=){_SECRET_VALUE}",
                          re.IGNORECASE)
_HF_TOKEN = re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{16,}")
_AUTH_HEADER = re.compile(r"(\bauthorization['\"]?\s*[:=]\s*['\"]?)(?:(?:bearer|basic|token)\s+)?"
                          r"[^\s,;'\"]+", re.IGNORECASE)
_BEARER = re.compile(r"\b(Bearer|BEARER)\s+[A-Za-z0-9._~+/=-]{6,}")

# Environment variables whose value is a secret, and those that hold a URL whose password is one.
SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "SAEREG_LLM_API_KEY")
URL_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "SAEREG_DATABASE_URL",
            "SAEREG_ARTIFACT_STORE", "SAEREG_LLM_URL", "HF_ENDPOINT")
_MIN_SECRET = 4  # shorter values are not searched for (they would mask ordinary text)


def known_secrets() -> list[str]:
    """The secret values this process was given: the variables in ``SECRET_VARS``, the
    passwords inside the URLs of ``URL_VARS``, and huggingface_hub's stored token (only when
    huggingface_hub is already imported)."""
    found = [os.environ.get(v) for v in SECRET_VARS]
    for var in URL_VARS:
        try:
            parts = urlsplit(os.environ.get(var) or "")
            found.append(parts.password)
        except ValueError:
            continue
    if "huggingface_hub" in sys.modules:
        try:
            from huggingface_hub import get_token

            token = get_token()
        except Exception:  # noqa: BLE001 - no stored token, or an unreadable one
            token = None
        found.append(token)
    return [s for s in found if s]


def redact(text: object, *secrets: str | None) -> str:
    """``text`` (any object, as ``str``) with every secret masked as ``***``: the values in
    ``secrets`` and :func:`known_secrets` (also URL-encoded), URL userinfo
    (``scheme://user:***@host``, ``scheme://***@host``), ``token=``/``key=``/``password=``/
    ``signature=`` style parameters, ``hf_...`` tokens and Authorization/Bearer values.

    The one redaction function: every message, log line, tag, param or file that can carry a
    URL, a header or an error from a remote service goes through it."""
    out = str(text)
    values = {s for s in (*secrets, *known_secrets()) if s and len(s) >= _MIN_SECRET}
    for value in list(values):
        values |= {unquote(value), quote(value, safe="")}
    for value in sorted(values, key=len, reverse=True):
        out = out.replace(value, MASK)
    out = _USERINFO.sub(lambda m: m.group(1) + (f"{m.group(2)}:{MASK}@" if m.group(3) is not None
                                                else f"{MASK}@"), out)
    out = _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, out)
    out = _TEXT_SECRET.sub(lambda m: m.group(1) + MASK, out)
    out = _HF_TOKEN.sub(f"hf_{MASK}", out)
    out = _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, out)
    return _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", out)


class SaeRegError(Exception):
    """Base class of every error this project raises on purpose."""

    exit_code = 1


class UsageError(SaeRegError):
    """The user asked for something invalid (a bad parameter); CLI exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration value is out of range or inconsistent with another one.

    ``field`` names the config field (the library argument) to fix, when there is one; the
    message then starts with that name. The CLI shows the option that sets the field instead.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # keep ``field`` across pickling (e.g. between processes)
        return type(self), (str(self), self.field)


class NotFoundError(SaeRegError):
    """A named thing (model, hook point, dataset, SAE) does not exist."""

    def __init__(self, kind: str, name: str, known: Iterable[str] = (), hint: str = ""):
        self.kind, self.name = kind, name
        known = list(known)
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        if not close:
            close = [k for k in known if name.lower() in k.lower()][:5]
        msg = f"unknown {kind} {name!r}"
        if close:
            msg += "; did you mean: " + ", ".join(close)
        elif known and len(known) <= 12:
            msg += "; known: " + ", ".join(known)
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
        self.near_matches = close


class ModelNotFoundError(NotFoundError):
    def __init__(self, name: str, known: Iterable[str] = (), hint: str = ""):
        super().__init__("model", name, known, hint)


class HookNotFoundError(NotFoundError):
    def __init__(self, name: str, known: Iterable[str] = (), hint: str = ""):
        super().__init__("hook point", name, known, hint)


class DatasetError(SaeRegError):
    """A dataset cannot be read (missing path, unreadable file, no text column)."""


class SAEFormatError(SaeRegError):
    """An SAE folder is missing files or its config disagrees with its tensors."""


class TrainingDivergedError(SaeRegError):
    """NaN or inf appeared in activations or in the loss."""

    def __init__(self, step: int, hook: str, what: str):
        self.step, self.hook, self.what = step, hook, what
        super().__init__(f"non-finite {what} at step {step} on hook {hook!r}; training stopped, "
                         "the last good checkpoint is kept")


class TrainingInterrupted(BaseException):
    """Ctrl-C (SIGINT) stopped a training job; its folder keeps the last checkpoint for
    ``saereg train --resume``. A ``BaseException`` like ``KeyboardInterrupt`` (``except
    Exception`` does not swallow it), but not one: Lightning ends the process on a
    ``KeyboardInterrupt`` before the job can record that it stopped. The CLI exits 130."""

    exit_code = 130


# -- catalog and artifact store ---------------------------------------------------------------

def _ranges(numbers: Iterable[int]) -> str:
    """1, 2, 3, 5, 7, 8 -> '1-3, 5, 7, 8'."""
    out: list[str] = []
    nums = sorted(set(numbers))
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        if j - i >= 2:
            out.append(f"{nums[i]}-{nums[j]}")
        else:
            out.extend(str(n) for n in nums[i:j + 1])
        i = j + 1
    return ", ".join(out)


class SAENotFoundError(NotFoundError):
    """No SAE of that name in the catalog."""

    def __init__(self, name: str, known: Iterable[str] = (), hint: str = ""):
        super().__init__("SAE", name, known, hint)


class VersionNotFoundError(NotFoundError):
    """The SAE exists but has no such version number or alias."""

    def __init__(self, name: str, wanted: str, versions: Iterable[int], aliases: Iterable[str]):
        self.kind, self.name, self.wanted = "version", name, wanted
        versions, aliases = list(versions), sorted(aliases)
        what = "no versions" if not versions else f"versions {_ranges(versions)}"
        what += f" and aliases {', '.join(aliases)}" if aliases else " and no aliases"
        self.near_matches = difflib.get_close_matches(wanted, aliases, n=3, cutoff=0.5)
        Exception.__init__(self, f"unknown version {name}@{wanted}: SAE {name!r} has {what}")


class SAEMismatchError(UsageError):
    """A registration disagrees with what the SAE name is bound to (model, hook, shape)."""


class NotSupportedError(UsageError):
    """A valid request that this version of the software does not handle yet."""


class ChecksumError(SaeRegError):
    """A stored artifact no longer matches the sha256 recorded at registration."""

    def __init__(self, file: str, expected: str, actual: str, where: str = ""):
        self.file, self.expected, self.actual = file, expected, actual
        at = f" ({where})" if where else ""
        super().__init__(f"checksum mismatch for {file}{at}: expected sha256 {expected}, "
                         f"found {actual}; the stored file is corrupt, refusing to load it")


class HubError(SaeRegError):
    """The Hugging Face Hub (or the server at HF_ENDPOINT) refused or failed a request."""


class CatalogNotMigratedError(SaeRegError):
    """The catalog database is not at the schema revision this software needs."""


class CatalogBusyError(SaeRegError):
    """The catalog stayed locked (or kept failing to serialise) through every retry."""


class CatalogUnavailableError(SaeRegError):
    """The catalog database cannot be reached or opened: a server that refuses or does not
    answer, a SQLite file whose folder is missing or not writable, a file that is not a
    database. The message names the host and port or the path (never a password)."""


class SchemaRevisionError(UsageError):
    """A schema revision that does not exist, or is not a valid target from where the catalog
    is (``db downgrade +1``); the message lists the known revisions."""


class ConfirmationRequiredError(SaeRegError):
    """A destructive change needs a yes and there is no terminal to ask on (pass ``--yes``)."""


class DestinationError(SaeRegError):
    """A destination path cannot be written (a file where a folder must be, a folder that is
    not writable); nothing was written."""


class MirrorError(SaeRegError):
    """The MLflow Model Registry side of a catalog change failed; the catalog was left as is."""


class DeprecatedVersionWarning(UserWarning):
    """Loading a version that was deprecated (it still loads; the reason says what to use)."""


class InputWarning(UserWarning):
    """Input was accepted with an assumption, or with a part of it left out (an old SAELens
    cfg.json without ``architecture`` read as ReLU, a non-finite run metric not copied); the
    message names the file or value and says what was assumed or dropped."""
