"""The base layer: what an SAE is on disk (:mod:`.sae`), where it is recorded (:mod:`.catalog`)
and how it is published (:mod:`.hub`); references, typed errors and homes beside them.

The public Python API is :mod:`saereg.registry.api`, re-exported at the top as ``saereg.*``.
"""
