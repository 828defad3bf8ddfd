"""sae-registry: train, keep, study and share sparse autoencoders on language-model activations.

The installed namespace, one package per layer (imports go one way, each on the ones before):

- ``saereg.registry``   the base layer: what an SAE is on disk (``sae``), where it is recorded
  (``catalog``), how it is published (``hub``), references, errors and homes;
- ``saereg.training``   language-model access, data, activation caches, losses, Lightning;
- ``saereg.analysis``   feature statistics, labels, search, neighbours, steering;
- ``saereg.migrations`` the catalog's Alembic scripts;
- ``saereg.commands``   the ``saereg`` command line, one module per command group.

The public API is re-exported here and imported on first use, so ``import saereg`` stays light
(no torch, no MLflow): ``from saereg import load_sae; sae = load_sae("name@prod")``.
"""

_LAZY = {
    "load_sae": "saereg.registry.api",
    "export_sae": "saereg.registry.api",
    "register_from_run": "saereg.registry.api",
    "register_from_folder": "saereg.registry.api",
    "get_version": "saereg.registry.api",
    "import_sae": "saereg.registry.api",
    "convert_sae": "saereg.registry.api",
    "gc": "saereg.registry.api",
    "Catalog": "saereg.registry.catalog.writes",
    "VersionInfo": "saereg.registry.catalog.queries",
    "DeprecatedVersionWarning": "saereg.registry.errors",
    "SaeRegError": "saereg.registry.errors",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'saereg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
