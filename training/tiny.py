"""A tiny randomly initialised LLaMA-shaped model with a tokenizer trained on the spot.

For unit tests and examples that need a real transformers model without any download.
"""

from __future__ import annotations

import itertools
import pathlib

import torch

from saereg.registry.errors import ConfigError
from saereg.training.lm import _no_progress_bars


def build_tiny_llama(path: pathlib.Path, *, vocab_size: int = 512, hidden_size: int = 64,
                     n_layers: int = 4, n_heads: int = 4, seed: int = 0) -> pathlib.Path:
    """Write a tiny randomly initialised LLaMA and a byte-level BPE tokenizer trained here.

    The tokenizer is trained on the first ~300 k characters of the default corpus, with
    ``<|endoftext|>`` as BOS, EOS and PAD; like LLaMA tokenizers it prepends BOS unless called
    with ``add_special_tokens=False``. Deterministic for given arguments; ``load_lm(path)``
    loads the result.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from saereg.training.data import default_corpus

    if vocab_size < 257:
        raise ConfigError(f"vocab_size must be at least 257 (256 bytes + 1 special), got {vocab_size}")
    corpus = default_corpus()
    lengths = itertools.accumulate(len(text) for _, text in corpus)
    texts = [text for (_, text), before in zip(corpus, itertools.chain([0], lengths))
             if before < 300_000]
    special = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.TemplateProcessing(  # prepends BOS, as LLaMA tokenizers do
        single=f"{special} $A", pair=f"{special} $A {special} $B", special_tokens=[(special, 0)])
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[special], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=special, eos_token=special,
                                        pad_token=special, model_max_length=256)
    special_id = tokenizer.convert_tokens_to_ids(special)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=128,
                         num_hidden_layers=n_layers, num_attention_heads=n_heads,
                         num_key_value_heads=n_heads, max_position_embeddings=256,
                         bos_token_id=special_id, eos_token_id=special_id, pad_token_id=special_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path
