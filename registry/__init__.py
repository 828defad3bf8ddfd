"""sae-registry base layer: what an SAE is on disk, and where it is recorded."""

# The Python API, imported on first use so that ``import registry`` stays light (no torch,
# no MLflow): ``from registry import load_sae; sae = load_sae("name@prod", device="cuda")``.
_LAZY = {
    "load_sae": "registry.api",
    "export_sae": "registry.api",
    "register_from_run": "registry.api",
    "register_from_folder": "registry.api",
    "get_version": "registry.api",
    "gc": "registry.api",
    "Catalog": "registry.catalog",
    "VersionInfo": "registry.queries",
    "DeprecatedVersionWarning": "registry.errors",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'registry' has no attribute {name!r}")
