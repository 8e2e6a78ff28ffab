"""The Megatron indexed format: our writer/reader, and compatibility with megatron-core."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from hpctrain.launcher.contract.corpus import TokenStream
from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.indexed import IndexedFile, IndexedWriter, token_dtype


def _docs(rng, n, vocab):
    return [rng.integers(0, vocab, rng.integers(1, 50)).astype(np.int64) for _ in range(n)]


@pytest.mark.parametrize("vocab", [1000, 70000])
def test_write_then_read_gives_back_every_document(tmp_path, vocab):
    rng = np.random.default_rng(0)
    docs = _docs(rng, 40, vocab)
    w = IndexedWriter(tmp_path / "x", token_dtype(vocab))
    for d in docs:
        w.add_document(d)
    w.close()
    f = IndexedFile(tmp_path / "x")
    assert f.dtype == (np.uint16 if vocab < 65500 else np.int32)
    assert f.num_documents == 40
    assert f.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(f.document(i), d)


def test_stream_reads_across_shards(tmp_path):
    parts = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 30)]
    files = []
    for k, p in enumerate(parts):
        w = IndexedWriter(tmp_path / f"s{k}", np.uint16)
        w.add_document(p)
        w.close()
        files.append(IndexedFile(tmp_path / f"s{k}"))
    s = TokenStream(tuple(files))
    assert s.num_tokens == 30
    np.testing.assert_array_equal(s.read(8, 10), np.arange(8, 18))
    np.testing.assert_array_equal(s.document_starts(0, 30), [0, 10, 13])


def test_garbage_index_is_a_clear_error(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"not an index at all, no magic here.....")
    (tmp_path / "x.bin").write_bytes(b"\0" * 8)
    with pytest.raises(UserError, match="bad magic"):
        IndexedFile(tmp_path / "x")


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def test_we_read_what_megatron_core_writes(tmp_path):
    import torch

    idx = _megatron()
    rng = np.random.default_rng(1)
    docs = _docs(rng, 25, 50000)
    b = idx.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    for d in docs[:10]:
        b.add_item(torch.from_numpy(d))
        b.end_document()
    # a document of two sequences, as Megatron's sentence splitting produces
    b.add_document(torch.from_numpy(np.concatenate(docs[10:12])), [len(docs[10]), len(docs[11])])
    for d in docs[12:]:
        b.add_item(torch.from_numpy(d))
        b.end_document()
    b.finalize(str(tmp_path / "m.idx"))

    f = IndexedFile(tmp_path / "m")
    expected = docs[:10] + [np.concatenate(docs[10:12])] + docs[12:]
    assert f.num_documents == len(expected)
    for i, d in enumerate(expected):
        np.testing.assert_array_equal(f.document(i), d)
    np.testing.assert_array_equal(f.tokens, np.concatenate(docs))


def test_megatron_core_reads_what_we_write(tmp_path):
    idx = _megatron()
    rng = np.random.default_rng(2)
    docs = _docs(rng, 30, 100000)
    w = IndexedWriter(tmp_path / "ours", token_dtype(100000))
    for d in docs:
        w.add_document(d)
    w.close()
    ds = idx.IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == len(docs)
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
