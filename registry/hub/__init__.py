"""Publishing to the Hugging Face Hub and pulling back: :mod:`.sync` (push, pull, ``hf://``
downloads), :mod:`.card` (registry.json and the repo README), :mod:`.features`
(features.parquet)."""
