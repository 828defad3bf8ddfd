"""Loading the model an SAE version was trained on."""

from __future__ import annotations


def load_model(name: str):
    """``saereg.training.lm.load_lm`` for a model name recorded in the catalog. The packaged model is
    recorded under its hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``), which offline
    machines cannot fetch; its last path part is the packaged alias, so that is tried next."""
    from saereg.registry.errors import ModelNotFoundError
    from saereg.training.lm import load_lm

    try:
        return load_lm(name)
    except ModelNotFoundError:
        alias = name.rsplit("/", 1)[-1]
        if alias == name:
            raise
        try:
            lm = load_lm(alias)
        except ModelNotFoundError:
            raise ModelNotFoundError(name) from None
        if lm.name != name:
            raise ModelNotFoundError(name, hint=f"{alias!r} is {lm.name!r}") from None
        return lm
