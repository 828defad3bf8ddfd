"""Loading the model an SAE version was trained on."""

from __future__ import annotations


def load_model(name: str):
    """``saereg.training.lm.load_lm`` for a model name recorded in the catalog or an SAE's
    ``cfg.json``, mapped by ``saereg.training.lm.model_ref``: the packaged model, recorded under
    its hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) or its alias (``smollm2-135m``), loads
    from its converted copy; a hub id in huggingface_hub's cache loads from there. Neither asks
    the hub."""
    from saereg.training.lm import load_lm, model_ref

    return load_lm(model_ref(name))
