"""saereg.training.data: the offline default corpus is large and deterministic; local files (txt
paragraphs, jsonl rows, gzipped jsonl, folders) are read with stable doc ids and typed errors;
the held-out split is a stable hash; TokenWindows packs the token stream into full windows that
start with BOS, separate documents with EOS, are contiguous slices of the stream, keep train
and held-out documents apart, resume exactly with skip_windows and record where every token
came from."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

import saereg.training.corpus as corpus_module
from saereg.registry.errors import ConfigError, DatasetError
from saereg.training.data import TokenWindows, default_corpus, is_held_out, iter_documents


def test_default_corpus_is_large_unique_and_deterministic():
    corpus = default_corpus()
    total = sum(len(text) for _, text in corpus)
    # ~3.1 M characters on CPython 3.11; the exact figure follows the Python version.
    assert total > 2_500_000
    ids = [doc_id for doc_id, _ in corpus]
    assert len(set(ids)) == len(ids)
    assert all(len(text) >= 40 and text == text.strip() for _, text in corpus)
    # shuffled once, with a fixed seed: every kind of text appears early on
    first_kinds = {doc_id.split(":")[0] + (":comments" if doc_id.endswith("#comments") else "")
                   for doc_id in ids[:200]}
    assert {"pydoc", "stdlib", "stdlib:comments"} <= first_kinds
    assert "stdlib:builtins.str.join" in ids
    assert any(doc_id.startswith("stdlib:json.") for doc_id in ids)
    assert any(doc_id.endswith("#comments") for doc_id in ids)
    # A caller mutating the list does not change the cached corpus.
    corpus.clear()
    assert len(default_corpus()) == len(ids)
    # Rebuilding from scratch gives the very same documents in the same order.
    cached = corpus_module._CORPUS
    try:
        corpus_module._CORPUS = None
        assert default_corpus() == list(zip(ids, (t for _, t in cached)))
    finally:
        corpus_module._CORPUS = cached


def test_iter_documents_default_is_the_default_corpus():
    first = list(zip(range(5), iter_documents()))
    assert [doc for _, doc in first] == default_corpus()[:5]
    assert next(iter(iter_documents("default"))) == default_corpus()[0]


def test_iter_documents_reads_txt_paragraphs(corpus_dir):
    paragraphs = (corpus_dir / "a.txt").read_text().strip().split("\n\n")
    docs = list(iter_documents(str(corpus_dir / "a.txt")))
    assert docs == [(f"a.txt:{i}", p) for i, p in enumerate(paragraphs)]


def test_iter_documents_reads_jsonl_rows(corpus_dir, tmp_path):
    rows = [json.loads(line) for line in (corpus_dir / "sub" / "c.jsonl").read_text().splitlines()]
    docs = list(iter_documents(str(corpus_dir / "sub" / "c.jsonl")))
    assert docs == [(f"c.jsonl:{i}", row["text"]) for i, row in enumerate(rows)]
    titles = list(iter_documents(str(corpus_dir / "sub" / "c.jsonl"), text_column="title"))
    assert titles[3] == ("c.jsonl:3", "paragraph 3")
    packed = tmp_path / "c.jsonl.gz"
    packed.write_bytes(gzip.compress((corpus_dir / "sub" / "c.jsonl").read_bytes()))
    assert list(iter_documents(str(packed))) == [(f"c.jsonl.gz:{i}", t) for i, (_, t) in enumerate(docs)]


def test_iter_documents_reads_a_folder_in_sorted_order(corpus_dir):
    docs = list(iter_documents(str(corpus_dir)))
    files = [doc_id.rsplit(":", 1)[0] for doc_id, _ in docs]
    assert list(dict.fromkeys(files)) == ["a.txt", "b.txt", "sub/c.jsonl"]
    assert len(docs) == 12 + 12 + 16


def test_missing_path_raises_dataset_error_naming_it(tmp_path, tiny_lm):
    missing = tmp_path / "nowhere" / "corpus.jsonl"
    with pytest.raises(DatasetError, match="cannot read dataset .*nowhere/corpus.jsonl"):
        iter_documents(str(missing))
    with pytest.raises(DatasetError, match="nowhere"):
        TokenWindows(tiny_lm.tokenizer, 8, dataset=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no"):
        iter_documents(str(tmp_path / "empty"))


def test_jsonl_without_text_column_names_the_columns(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text("".join(json.dumps({"id": i, "score": i / 2}) + "\n" for i in range(3)))
    with pytest.raises(DatasetError, match="no text column; columns: id, score"):
        list(iter_documents(str(path)))
    with pytest.raises(DatasetError, match="no column 'body'; columns: id, score"):
        list(iter_documents(str(path), text_column="body"))


def test_first_string_column_is_used_without_text_column(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text(json.dumps({"n": 1, "body": "first note body"}) + "\n"
                    + json.dumps({"n": 2, "body": "second note body"}) + "\n")
    assert list(iter_documents(str(path))) == [("notes.jsonl:0", "first note body"),
                                               ("notes.jsonl:1", "second note body")]


def test_unreachable_hub_dataset_raises_dataset_error():
    with pytest.raises(DatasetError, match="hub may be unreachable.*work offline"):
        list(iter_documents("someone/no-such-dataset"))


def test_held_out_split_is_stable_and_sized():
    ids = [f"doc-{i}" for i in range(20_000)]
    held = [doc_id for doc_id in ids if is_held_out(doc_id)]
    assert 0.015 < len(held) / len(ids) < 0.025
    assert held == [doc_id for doc_id in ids if is_held_out(doc_id, 0.02)]
    assert not any(is_held_out(doc_id, 0.0) for doc_id in ids[:1000])
    # A bigger fraction holds out a superset.
    assert set(held) <= {doc_id for doc_id in ids if is_held_out(doc_id, 0.1)}
    with pytest.raises(ConfigError):
        is_held_out("x", 1.0)


def _stream(tokenizer, dataset, held_out, fraction):
    """The token stream TokenWindows should pack: each kept document's tokens, then EOS."""
    stream, docs = [], {}
    for doc_id, text in iter_documents(dataset):
        if is_held_out(doc_id, fraction) == held_out:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            docs[doc_id] = ids
            stream += ids + [tokenizer.eos_token_id]
    return stream, docs


@pytest.mark.parametrize("held_out", [False, True])
def test_windows_are_contiguous_slices_of_the_stream(tiny_lm, corpus_dir, held_out):
    tok = tiny_lm.tokenizer
    size = 32
    windows = list(TokenWindows(tok, size, dataset=str(corpus_dir), held_out=held_out,
                                held_out_fraction=0.3))
    stream, _ = _stream(tok, str(corpus_dir), held_out, 0.3)
    assert len(windows) == len(stream) // (size - 1) > 5
    for i, window in enumerate(windows):
        assert window.input_ids.dtype == torch.long
        assert window.input_ids.shape == (size,)
        assert window.input_ids[0].item() == tok.bos_token_id
        assert window.input_ids[1:].tolist() == stream[i * (size - 1):(i + 1) * (size - 1)]


def test_documents_are_separated_by_eos_and_provenance_matches(tiny_lm, corpus_dir):
    tok = tiny_lm.tokenizer
    eos = tok.eos_token_id
    windows = list(TokenWindows(tok, 24, dataset=str(corpus_dir), held_out_fraction=0.3))
    _, docs = _stream(tok, str(corpus_dir), False, 0.3)
    seen = []
    for window in windows:
        ids = window.input_ids.tolist()
        bounds = [pos for pos, _, _ in window.starts] + [len(ids)]
        assert bounds[0] == 1 and bounds == sorted(bounds)
        for (pos, index, offset), end in zip(window.starts, bounds[1:]):
            doc_tokens = docs[window.doc_ids[index]] + [eos]
            assert ids[pos:end] == doc_tokens[offset:offset + end - pos]
            assert tok.decode(ids[pos:end]) == tok.decode(doc_tokens[offset:offset + end - pos])
            if end < len(ids):  # a segment that stops inside the window ends its document with EOS
                assert ids[end - 1] == eos and offset + end - pos == len(doc_tokens)
            if offset == 0 and pos > 1:  # a document that starts inside the window follows an EOS
                assert ids[pos - 1] == eos
        seen += [d for d in window.doc_ids if not seen or d != seen[-1]]
    kept = [d for d, _ in iter_documents(str(corpus_dir)) if not is_held_out(d, 0.3)]
    assert seen == kept[:len(seen)] and len(seen) >= len(kept) - 1


def test_train_and_held_out_windows_use_disjoint_documents(tiny_lm, corpus_dir):
    def doc_ids(held_out):
        windows = TokenWindows(tiny_lm.tokenizer, 16, dataset=str(corpus_dir), held_out=held_out,
                               held_out_fraction=0.3)
        return {d for w in windows for d in w.doc_ids}

    train, held = doc_ids(False), doc_ids(True)
    assert train and held and not train & held
    assert all(is_held_out(d, 0.3) for d in held) and not any(is_held_out(d, 0.3) for d in train)


def test_skip_windows_matches_dropping_windows(tiny_lm, corpus_dir):
    tok = tiny_lm.tokenizer
    full = list(TokenWindows(tok, 20, dataset=str(corpus_dir)))
    resumed = TokenWindows(tok, 20, dataset=str(corpus_dir), skip_windows=7)
    rest = list(resumed)
    assert len(rest) == len(full) - 7 and resumed.windows_yielded == len(rest)
    for a, b in zip(full[7:], rest):
        assert torch.equal(a.input_ids, b.input_ids)
        assert (a.doc_ids, a.starts) == (b.doc_ids, b.starts)


def test_batches_stack_windows_and_drop_the_remainder(tiny_lm, corpus_dir):
    tok = tiny_lm.tokenizer
    windows = list(TokenWindows(tok, 16, dataset=str(corpus_dir)))
    stream = TokenWindows(tok, 16, dataset=str(corpus_dir))
    batches = list(stream.batches(5))
    assert len(batches) == len(windows) // 5
    for i, (ids, batch_windows) in enumerate(batches):
        assert ids.shape == (5, 16) and ids.dtype == torch.long
        assert torch.equal(ids, torch.stack([w.input_ids for w in windows[5 * i:5 * i + 5]]))
        assert [w.starts for w in batch_windows] == [w.starts for w in windows[5 * i:5 * i + 5]]
    assert stream.windows_yielded == len(windows)


def test_default_corpus_windows_stream_lazily(tiny_lm):
    windows = iter(TokenWindows(tiny_lm.tokenizer, 64))
    first = next(windows)
    assert first.doc_ids[0] == next(d for d, _ in default_corpus() if not is_held_out(d))
    assert first.input_ids.shape == (64,)


def test_invalid_window_settings_raise_config_error(tiny_lm):
    with pytest.raises(ConfigError, match="context_size"):
        TokenWindows(tiny_lm.tokenizer, 1)
    with pytest.raises(ConfigError, match="skip_windows"):
        TokenWindows(tiny_lm.tokenizer, 8, skip_windows=-1)
    with pytest.raises(ConfigError, match="batch_size"):
        next(TokenWindows(tiny_lm.tokenizer, 8).batches(0))
