"""The Megatron indexed-dataset format (`.bin` tokens + `.idx` index), read and written.

Layout of the `.idx` file (little endian), as megatron-core and GPT-NeoX write it:

    b"MMIDIDX\\x00\\x00"   9-byte magic
    <Q version (1)       <B dtype code        <Q sequence count   <Q document count
    int32[sequence_count]  sequence lengths (tokens)
    int64[sequence_count]  sequence byte offsets into `.bin`
    int64[document_count]  document indices: sequence index where each document
                           starts, beginning with 0 and ending with sequence_count
    (int8[sequence_count]  sequence modes, multimodal files only; never written here)

We write one sequence per document, so documents and sequences coincide; files
from Megatron that group several sequences into one document read correctly
because the reader works from the document indices.

Only numpy here: the reader memory-maps both files, so opening costs the same
for a 1 MB and a 100 GB file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from hpctrain.launcher.contract.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1

# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py).
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class FormatError(UserError):
    """A file that is not a valid indexed dataset (a user-fixable input problem)."""


def token_dtype(vocab_size: int) -> type[np.number]:
    """The token dtype Megatron picks for a vocabulary: uint16 below 65500, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def prefix_of(path: str | os.PathLike) -> str:
    """Accept `x`, `x.bin` or `x.idx` and return the prefix `x`."""
    p = str(path)
    if p.endswith((".bin", ".idx")):
        return p[:-4]
    return p


def shard_counts(prefix: str | os.PathLike) -> tuple[int, int]:
    """(tokens, documents) of one `.bin`/`.idx` pair, checked against the files' sizes.

    Reads the 34-byte header and two numbers near the end of the `.idx` and stats
    both files: no scan, so start-up stays flat in corpus size. A `.bin` or `.idx`
    that is shorter (or longer) than the index promises -- a half-finished copy to
    a cluster's scratch -- raises a FormatError naming the file and both sizes.
    """
    base = prefix_of(prefix)
    idx_path, bin_path = base + ".idx", base + ".bin"
    for p in (idx_path, bin_path):
        if not os.path.isfile(p):
            raise FormatError("file not found", file=p, expected="a .bin/.idx pair")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(34)
        if len(header) < 34 or header[:9] != MAGIC:
            raise FormatError("not a Megatron indexed dataset (bad magic or header)", file=idx_path)
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION or header[17] not in DTYPE_CODES:
            raise FormatError(f"unsupported index (version {version}, dtype code {header[17]})",
                              file=idx_path)
        itemsize = np.dtype(DTYPE_CODES[header[17]]).itemsize
        seqs, docs = struct.unpack("<QQ", header[18:34])
        want_idx = 34 + 12 * seqs + 8 * docs
        # multimodal Megatron files append one int8 mode per sequence
        if idx_size not in (want_idx, want_idx + seqs):
            raise FormatError(f"index is {idx_size:,} bytes but its header promises {want_idx:,} "
                              "(truncated or overwritten)", file=idx_path,
                              expected="a complete copy of the .idx file")
        want_bin = 0
        if seqs:
            f.seek(34 + 4 * (seqs - 1))
            (last_len,) = struct.unpack("<i", f.read(4))
            f.seek(34 + 4 * seqs + 8 * (seqs - 1))
            (last_ptr,) = struct.unpack("<q", f.read(8))
            want_bin = last_ptr + last_len * itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != want_bin:
        raise FormatError(f"{bin_size:,} bytes on disk but its index promises {want_bin:,} "
                          f"({'truncated: a partial copy?' if bin_size < want_bin else 'longer than indexed'})",
                          file=bin_path, expected=f"{want_bin:,} bytes (a complete copy)")
    return want_bin // itemsize, max(docs - 1, 0)


class IndexedFile:
    """One `.bin`/`.idx` pair, memory-mapped.

    `tokens` is the whole token stream of the file (all documents back to back);
    `doc_offsets[i]` is the token offset where document i starts, with one extra
    final entry equal to `num_tokens`.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = prefix_of(prefix)
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        shard_counts(self.prefix)  # sizes agree with the index (stat only), else a clear error
        with open(idx_path, "rb") as f:
            header = f.read(9 + 8 + 1 + 8 + 8)
        if len(header) < 34 or header[:9] != MAGIC:
            raise FormatError(f"{idx_path}: not a Megatron indexed dataset (bad magic)")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise FormatError(f"{idx_path}: unsupported index version {version}")
        code = header[17]
        if code not in DTYPE_CODES:
            raise FormatError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        seq_count, doc_count = struct.unpack("<QQ", header[18:34])
        idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = 34
        self.sequence_lengths = np.frombuffer(idx, np.int32, seq_count, off)
        off += 4 * seq_count
        self.sequence_pointers = np.frombuffer(idx, np.int64, seq_count, off)
        off += 8 * seq_count
        self.document_indices = np.frombuffer(idx, np.int64, doc_count, off)
        self._idx = idx
        size = os.path.getsize(bin_path)
        self.num_tokens = size // self.dtype.itemsize
        if seq_count:
            end = (
                int(self.sequence_pointers[-1])
                + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            )
            if end > size:
                raise FormatError(f"{bin_path}: shorter than its index says ({size} < {end} bytes)")
            self.num_tokens = end // self.dtype.itemsize
        # a plain ndarray view of the map: slicing an np.memmap subclass costs microseconds each
        self.tokens = (
            np.memmap(bin_path, mode="r", dtype=self.dtype, shape=(self.num_tokens,)).view(
                np.ndarray
            )
            if self.num_tokens
            else np.zeros(0, self.dtype)
        )

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    def doc_start(self, i: int) -> int:
        """Token offset where document `i` starts (i == num_documents gives the end)."""
        seq = int(self.document_indices[i])
        if seq >= len(self.sequence_pointers):
            return self.num_tokens
        return int(self.sequence_pointers[seq]) // self.dtype.itemsize

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i (a view into the memory map)."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range 0..{self.num_documents - 1}")
        return self.tokens[self.doc_start(i) : self.doc_start(i + 1)]


class IndexedWriter:
    """Writes one `.bin`/`.idx` pair, a document at a time.

    The `.idx` is written by `close()`; a file without its `.idx` is not a dataset,
    and the corpus-level writer only publishes directories whose files all closed.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number]) -> None:
        self.prefix = prefix_of(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"unsupported dtype {self.dtype}")
        self._bin = open(self.prefix + ".bin", "wb")  # noqa: SIM115 - closed in close()
        self._lengths: list[int] = []
        self.num_tokens = 0

    def add_document(self, tokens: np.ndarray) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: `tokens` concatenated, `lengths` per document."""
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.extend(int(x) for x in lengths)
        self.num_tokens += int(arr.size)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def close(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self.prefix + ".idx", "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<QQ", len(lengths), len(doc_indices)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_indices.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())


def is_indexed_prefix(path: str | os.PathLike) -> bool:
    p = prefix_of(path)
    return Path(p + ".idx").is_file() and Path(p + ".bin").is_file()
