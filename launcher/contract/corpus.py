"""A token corpus: shards of the indexed format plus `manifest.json`, read as one stream.

A corpus directory written by `hpctrain prepare` looks like

    corpus/manifest.json
    corpus/train-00000.bin  corpus/train-00000.idx  ...
    corpus/valid-00000.bin  corpus/valid-00000.idx

A bare Megatron prefix (`path/name` with `name.bin` + `name.idx`) opens too, as
a one-shard corpus without a manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpctrain.launcher.contract.errors import UserError, UserErrors
from hpctrain.launcher.contract.indexed import (
    FormatError,
    IndexedFile,
    is_indexed_prefix,
    prefix_of,
    shard_counts,
)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "hpctrain-corpus"


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of a corpus directory, or None for a bare Megatron prefix."""
    p = Path(path)
    if p.is_dir():
        m = p / MANIFEST
        if not m.is_file():
            return None
        with open(m) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise FormatError(f"{m}: not an hpctrain corpus manifest")
        if not isinstance(data.get("splits"), dict) or not isinstance(data.get("tokenizer"), dict):
            raise FormatError(f"{m}: no 'splits' and 'tokenizer' objects")
        return data
    return None


@dataclass(frozen=True)
class TokenStream:
    """Several indexed files read as one concatenated token stream."""

    files: tuple[IndexedFile, ...]

    def __post_init__(self) -> None:
        sizes = [f.num_tokens for f in self.files]
        object.__setattr__(self, "_starts", np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))

    @property
    def num_tokens(self) -> int:
        return int(self._starts[-1])

    @property
    def num_documents(self) -> int:
        return sum(f.num_documents for f in self.files)

    @property
    def dtype(self) -> np.dtype:
        return self.files[0].dtype

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the stream, crossing shard boundaries."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside 0..{self.num_tokens}")
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        local = start - int(self._starts[k])
        f = self.files[k]
        if local + length <= f.num_tokens:
            return f.tokens[local : local + length]
        parts, need = [], length
        while need:
            f = self.files[k]
            take = min(need, f.num_tokens - local)
            parts.append(f.tokens[local : local + take])
            need -= take
            k, local = k + 1, 0
        return np.concatenate(parts)

    def document_starts(self, start: int, end: int) -> np.ndarray:
        """Stream offsets in [start, end) where a document begins (binary search, no scan)."""
        out = []
        for k, f in enumerate(self.files):
            base = int(self._starts[k])
            if base >= end or base + f.num_tokens <= start or f.num_documents == 0:
                continue
            # document_indices[j] is a sequence index; pointers give byte offsets (both sorted:
            # binary searches only, nothing per document, since the loader asks for every sample)
            size = f.dtype.itemsize
            ptr = f.sequence_pointers
            lo = np.searchsorted(ptr, (start - base) * size, side="left")
            hi = np.searchsorted(ptr, (end - base) * size, side="left")
            seqs = np.arange(lo, hi)
            # only sequences that begin a document count as boundaries
            docs = f.document_indices[:-1]
            at = np.minimum(np.searchsorted(docs, seqs), max(len(docs) - 1, 0))
            is_doc = (docs[at] == seqs) if len(docs) else np.zeros(len(seqs), bool)
            out.append(ptr[seqs[is_doc]] // size + base)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def max_token_id(self, chunk: int = 1 << 24) -> int:
        """Largest token id in the stream (a full scan: used only without a manifest)."""
        best = -1
        for f in self.files:
            for i in range(0, f.num_tokens, chunk):
                best = max(best, int(f.tokens[i : i + chunk].max()))
        return best


@dataclass(frozen=True)
class Corpus:
    """A corpus opened for reading: its manifest (if any) and one stream per split."""

    path: str
    manifest: dict | None

    def split(self, name: str = "train") -> TokenStream:
        if self.manifest is None:
            if name != "train":
                raise FormatError(f"{self.path}: a bare indexed dataset has only the 'train' split")
            return TokenStream((IndexedFile(self.path),))
        splits = self.manifest["splits"]
        if name not in splits:
            raise FormatError(f"{self.path}: no split '{name}' (has {sorted(splits)})")
        files = tuple(IndexedFile(Path(self.path) / s) for s in splits[name]["shards"])
        if not files:
            raise FormatError(f"{self.path}: split '{name}' is empty")
        return TokenStream(files)

    @property
    def vocab_size(self) -> int | None:
        return None if self.manifest is None else int(self.manifest["tokenizer"]["vocab_size"])

    def max_token_id(self, split: str = "train") -> int:
        if self.manifest is not None and "max_token_id" in self.manifest["splits"][split]:
            return int(self.manifest["splits"][split]["max_token_id"])
        return self.split(split).max_token_id()


def corpus_problems(path: str | os.PathLike, manifest: dict | None) -> list[UserError]:
    """Every shard's `.bin`/`.idx` sizes against its index, and the index counts against
    the manifest: stat calls and a few header bytes per shard, no scan."""
    if manifest is None:
        try:
            shard_counts(path)
        except FormatError as e:
            return [e]
        return []
    problems: list[UserError] = []
    for name, split in manifest["splits"].items():
        tokens = docs = 0
        complete = True
        for shard in split["shards"]:
            try:
                t, d = shard_counts(Path(path) / shard)
            except FormatError as e:
                problems.append(e)
                complete = False
                continue
            tokens, docs = tokens + t, docs + d
        if complete and (tokens, docs) != (split["tokens"], split["documents"]):
            problems.append(
                UserError(
                    f"split '{name}': the shards hold {tokens:,} tokens in {docs:,} documents, "
                    f"the manifest says {split['tokens']:,} in {split['documents']:,}",
                    file=str(Path(path) / MANIFEST),
                    field=f"splits.{name}",
                    expected="shards and manifest from the same `hpctrain prepare`",
                )
            )
    return problems


def open_corpus(path: str | os.PathLike) -> Corpus:
    """Open a corpus directory (with manifest) or a bare Megatron `.bin/.idx` prefix,
    after checking that every shard is complete (see `corpus_problems`)."""
    p = Path(path)
    if p.is_dir():
        manifest = read_manifest(p)
        if manifest is None:
            raise UserError(
                f"no {MANIFEST} here",
                file=str(p),
                expected="a corpus written by `hpctrain prepare`",
            )
        problems = corpus_problems(p, manifest)
        if problems:
            raise UserErrors(problems)
        return Corpus(str(p), manifest)
    if is_indexed_prefix(p):
        problems = corpus_problems(prefix_of(p), None)
        if problems:
            raise UserErrors(problems)
        return Corpus(prefix_of(p), None)
    raise UserError(
        "corpus not found",
        file=str(p),
        expected="a corpus directory or a Megatron .bin/.idx prefix",
    )


def token_id_problem(top: int, vocab_size: int, split: str, file: str | None = None,
                     field: str | None = None) -> UserError | None:
    """The one rule for a corpus's largest token id against the model's vocabulary (`validate`
    reads the id from the manifest, the trainer from the corpus): every id below vocab_size."""
    if top < vocab_size:
        return None
    return UserError(f"corpus holds token id {top} in split '{split}' but the model's vocab size is {vocab_size} "
                     f"(a model of vocab size {vocab_size} takes ids 0..{vocab_size - 1})",
                     file=file, field=field, expected="a corpus tokenized for this model")


def check_token_ids(corpus: Corpus, vocab_size: int, *, split: str = "train") -> None:
    """Fail at start, not hours later in a CUDA assert, when a token id is >= vocab_size."""
    problem = token_id_problem(corpus.max_token_id(split), vocab_size, split, file=corpus.path)
    if problem is not None:
        raise problem
