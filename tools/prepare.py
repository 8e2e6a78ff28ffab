"""`hpctrain prepare`: raw text -> tokenized corpus in the Megatron indexed format.

    hpctrain prepare 'data/*.jsonl' --field text --tokenizer path/to/tok --out corpus/my --workers 4

Documents are read in order, tokenized in batches by N worker processes (the
pool returns batches in input order, so the output is byte-identical for any N),
an EOS is appended to each document, and a seeded hash of each document's
index sends it to the train or validation split. Everything is written into a
temporary directory beside the output and renamed into place only when
complete: an interrupted prepare leaves no corpus that looks finished.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hpctrain.launcher.contract.corpus import MANIFEST, MANIFEST_FORMAT
from hpctrain.launcher.contract.errors import UserError, run_command
from hpctrain.launcher.contract.indexed import IndexedWriter, token_dtype
from hpctrain.launcher.contract.paths import TOKENIZER_FILES, resolve_path, tokenizer_fingerprint

FORMATS = ("auto", "text", "jsonl", "csv", "parquet", "datasets")
BATCH_DOCS = 256


@dataclass
class PrepareOptions:
    inputs: list[str]
    tokenizer: str
    out: str
    format: str = "auto"
    field: str = "text"
    text_mode: str = "line"  # "line": one document per line; "file": one per file
    workers: int = 1
    shard_tokens: int = 1_000_000_000
    valid_fraction: float = 0.0
    seed: int = 1234
    eos_token: str | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass
class SplitStats:
    shards: list[str] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0
    max_token_id: int = -1


# ---------------------------------------------------------------- inputs


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Globs to a sorted, de-duplicated file list; every pattern must match something."""
    files: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        matches = [m for m in matches if os.path.exists(m)]
        if not matches:
            raise UserError(
                "no such file", file=pat, expected="an existing input file or a matching glob"
            )
        for m in matches:
            p = Path(m)
            if p.is_dir() and not _is_saved_dataset(p):
                raise UserError(
                    "is a directory", file=m, expected="files, or a `datasets` save_to_disk folder"
                )
            if not os.access(p, os.R_OK):
                raise UserError("not readable", file=m, expected="a file this user can read")
            if p not in files:
                files.append(p)
    return files


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and any(
        (p / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def detect_format(path: Path) -> str:
    if _is_saved_dataset(path):
        return "datasets"
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(
        suffix, "text"
    )


def _lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """(line number, text without newline, bytes consumed) of a text file."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8").rstrip("\r\n"), len(raw)
            except UnicodeDecodeError as e:
                raise UserError(f"line {n} is not UTF-8 ({e.reason})", file=str(path)) from None


def read_documents(path: Path, fmt: str, fld: str, text_mode: str) -> Iterator[tuple[str, int]]:
    """Yield (document text, progress units) from one input file."""
    if fmt == "text":
        if text_mode == "file":
            data = path.read_bytes()
            yield data.decode("utf-8", errors="strict"), len(data)
            return
        for _, text, nbytes in _lines(path):
            yield text, nbytes
    elif fmt == "jsonl":
        for n, line, nbytes in _lines(path):
            if not line.strip():
                yield "", nbytes
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"line {n} is not valid JSON ({e.msg})", file=str(path)) from None
            if not isinstance(rec, dict) or fld not in rec:
                have = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise UserError(
                    f"line {n} has no field '{fld}' (has {have})",
                    file=str(path),
                    field=fld,
                    expected="--field naming a string field of every record",
                )
            yield str(rec[fld]), nbytes
    elif fmt == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or fld not in reader.fieldnames:
                raise UserError(
                    f"no column '{fld}' (has {reader.fieldnames})",
                    file=str(path),
                    field=fld,
                    expected="--field naming a CSV column",
                )
            for row in reader:
                text = row[fld] or ""
                yield text, len(text.encode("utf-8")) + 1
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if fld not in pf.schema_arrow.names:
            raise UserError(
                f"no column '{fld}' (has {pf.schema_arrow.names})",
                file=str(path),
                field=fld,
                expected="--field naming a Parquet column",
            )
        for batch in pf.iter_batches(columns=[fld], batch_size=4096):
            for text in batch.column(0).to_pylist():
                yield text or "", 1
    elif fmt == "datasets":
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"dataset has splits {list(ds)}, no 'train'", file=str(path))
            ds = ds["train"]
        if fld not in ds.column_names:
            raise UserError(
                f"no column '{fld}' (has {ds.column_names})",
                file=str(path),
                field=fld,
                expected="--field naming a dataset column",
            )
        for batch in ds.select_columns([fld]).iter(batch_size=4096):
            for text in batch[fld]:
                yield text or "", 1
    else:
        raise UserError(f"unknown format '{fmt}'", field="--format", expected=" | ".join(FORMATS))


def progress_total(files: list[Path], fmt: str) -> tuple[int, str]:
    """Total progress units: bytes for line formats, rows for Parquet and datasets."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files), "doc"
    if fmt == "datasets":
        import datasets

        total = 0
        for f in files:
            ds = datasets.load_from_disk(str(f))
            total += len(ds["train"] if isinstance(ds, datasets.DatasetDict) else ds)
        return total, "doc"
    return sum(f.stat().st_size for f in files), "B"


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(path: str):
    p = Path(path)
    if not p.is_dir() or not any((p / n).is_file() for n in TOKENIZER_FILES):
        raise UserError(
            "no tokenizer here",
            file=path,
            field="--tokenizer",
            expected="a local directory with a Hugging Face tokenizer (tokenizer.json, vocab.txt, ...)",
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer: {e}", file=path, field="--tokenizer") from None


def resolve_eos(tok, eos_token: str | None) -> tuple[int, str]:
    """The id appended after each document: EOS, else SEP (BERT-style), else --eos-token."""
    if eos_token is not None:
        eid = tok.convert_tokens_to_ids(eos_token)
        if eid is None or eid == tok.unk_token_id:
            raise UserError(f"token '{eos_token}' is not in the vocabulary", field="--eos-token")
        return int(eid), eos_token
    for attr in ("eos_token", "sep_token"):
        t = getattr(tok, attr, None)
        if t is not None:
            return int(tok.convert_tokens_to_ids(t)), t
    raise UserError(
        "the tokenizer has neither an EOS nor a SEP token",
        field="--tokenizer",
        expected="a tokenizer with eos_token, or pass --eos-token",
    )


_worker_tok = None
_worker_eos = 0
_worker_dtype = np.uint16


def _init_worker(tok_path: str, eos_id: int, dtype: str) -> None:
    global _worker_tok, _worker_eos, _worker_dtype
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _worker_tok = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    _worker_eos, _worker_dtype = eos_id, np.dtype(dtype)


def _tokenize_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = _worker_tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=_worker_dtype)
    ends = np.cumsum(lengths)
    pos = 0
    for x, end in zip(ids, ends, strict=True):
        flat[pos : end - 1] = x
        flat[end - 1] = _worker_eos
        pos = end
    return flat, lengths


# ---------------------------------------------------------------- split + write


def valid_mask(doc_indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Seeded, order-independent choice of validation documents by document index."""
    from hpctrain.launcher.contract.split import seeded_fraction_mask

    return seeded_fraction_mask(doc_indices, fraction, seed)


class _SplitWriter:
    def __init__(self, root: Path, split: str, dtype, shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.stats = SplitStats()
        self._w: IndexedWriter | None = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        self.stats.documents += len(lengths)
        self.stats.tokens += int(tokens.size)
        self.stats.max_token_id = max(self.stats.max_token_id, int(tokens.max()))
        ends = np.cumsum(lengths)
        done_docs, done_tok = 0, 0
        while done_docs < len(lengths):
            if self._w is None or self._w.num_tokens >= self.shard_tokens:
                self._close()
                name = f"{self.split}-{len(self.stats.shards):05d}"
                self._w = IndexedWriter(self.root / name, self.dtype)
                self.stats.shards.append(name)
            # whole documents that fit the shard (at least one: a shard never splits a document)
            room = self.shard_tokens - self._w.num_tokens
            k = int(np.searchsorted(ends, done_tok + room, side="right"))
            k = max(k, done_docs + 1)
            self._w.add_documents(tokens[done_tok : int(ends[k - 1])], lengths[done_docs:k])
            done_docs, done_tok = k, int(ends[k - 1])

    def _close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def close(self) -> SplitStats:
        self._close()
        return self.stats


def _fingerprint(opts: PrepareOptions, files: list[Path], tok_hash: str) -> dict:
    return {
        "sources": [
            {"path": str(f), "bytes": f.stat().st_size if f.is_file() else None} for f in files
        ],
        "tokenizer_sha256": tok_hash,
        "format": opts.format,
        "field": opts.field,
        "text_mode": opts.text_mode,
        "shard_tokens": opts.shard_tokens,
        "valid_fraction": opts.valid_fraction,
        "seed": opts.seed,
        "eos_token": opts.eos_token,
    }


def _check_output(out: Path, fingerprint: dict, overwrite: bool) -> bool:
    """True when `out` already holds this very corpus (nothing to do)."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError("exists and is not a directory", file=str(out), field="--out")
    if not any(out.iterdir()):
        return False
    m = out / MANIFEST
    if overwrite:
        if not m.is_file():
            raise UserError(
                "holds files but no corpus; refusing to overwrite it",
                file=str(out),
                field="--out",
                expected="an empty directory or an earlier hpctrain corpus",
            )
        return False
    if m.is_file():
        with open(m) as f:
            old = json.load(f)
        if old.get("fingerprint") == fingerprint:
            return True
        raise UserError(
            "already holds a different corpus",
            file=str(out),
            field="--out",
            hint="pass --overwrite to replace it, or choose another --out",
        )
    raise UserError(
        "is not empty and holds no corpus",
        file=str(out),
        field="--out",
        expected="a new or empty directory",
    )


def prepare_corpus(opts: PrepareOptions, log=print) -> dict:
    """Tokenize `opts.inputs` into a corpus at `opts.out`; returns the manifest."""
    if opts.format not in FORMATS:
        raise UserError(
            f"unknown format '{opts.format}'", field="--format", expected=" | ".join(FORMATS)
        )
    if opts.text_mode not in ("line", "file"):
        raise UserError(
            f"unknown text mode '{opts.text_mode}'", field="--text-mode", expected="line | file"
        )
    if opts.workers < 1:
        raise UserError(f"{opts.workers} workers", field="--workers", expected="an integer >= 1")
    if not 0 <= opts.valid_fraction < 1:
        raise UserError(
            f"{opts.valid_fraction}", field="--valid-fraction", expected="a number in [0, 1)"
        )
    if opts.shard_tokens < 1:
        raise UserError(
            f"{opts.shard_tokens}", field="--shard-tokens", expected="a positive token count"
        )
    files = expand_inputs(opts.inputs)
    fmts = {detect_format(f) if opts.format == "auto" else opts.format for f in files}
    if len(fmts) > 1:
        raise UserError(
            f"inputs mix formats {sorted(fmts)}", field="inputs", expected="one format per prepare"
        )
    fmt = fmts.pop()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; N workers = N cores
    tok = load_tokenizer(opts.tokenizer)
    eos_id, eos_tok = resolve_eos(tok, opts.eos_token)
    tokenizer = CorpusTokenizer(tok, opts.tokenizer, tokenizer_fingerprint(opts.tokenizer), eos_id, eos_tok)
    out = Path(opts.out)
    fingerprint = _fingerprint(opts, files, tokenizer.sha256)
    if _check_output(out, fingerprint, opts.overwrite):
        log(f"{out}: already holds this corpus; nothing to do")
        with open(out / MANIFEST) as f:
            return json.load(f)

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        manifest = _write(opts, files, fmt, stage, tokenizer, log)
        manifest["fingerprint"] = fingerprint
        _write_json(stage / MANIFEST, manifest)
        _publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


@dataclass(frozen=True)
class CorpusTokenizer:
    """The tokenizer a corpus is prepared with, and what its manifest records of it."""

    tok: object
    path: str
    sha256: str
    eos_id: int
    eos_token: str

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(token_dtype(self.vocab_size))

    def manifest(self) -> dict:
        return {"path": str(Path(self.path).resolve()), "sha256": self.sha256, "class": type(self.tok).__name__,
                "vocab_size": self.vocab_size, "eos_id": self.eos_id, "eos_token": self.eos_token}


def _write(opts, files: list[Path], fmt: str, stage: Path, tokenizer: CorpusTokenizer, log) -> dict:
    """Tokenize every document into the train and valid shards under `stage`; the manifest."""
    writers = {s: _SplitWriter(stage, s, tokenizer.dtype, opts.shard_tokens) for s in ("train", "valid")}
    t0 = time.perf_counter()
    docs, skipped = _tokenize_into(writers, opts, files, fmt, tokenizer)
    stats = {s: w.close() for s, w in writers.items()}
    if docs == 0:
        raise UserError(
            "the inputs hold no document (all empty)",
            file=", ".join(map(str, files)),
            expected="at least one non-empty document",
        )
    if opts.valid_fraction > 0 and stats["valid"].documents == 0:
        log(f"warning: --valid-fraction {opts.valid_fraction} selected no document out of {docs}")
    seconds = time.perf_counter() - t0
    ntok = stats["train"].tokens + stats["valid"].tokens
    log(
        f"prepared {docs:,} documents, {ntok:,} tokens in {seconds:.1f}s "
        f"({ntok / max(seconds, 1e-9):,.0f} tokens/s, {opts.workers} worker(s)); "
        f"skipped {skipped} empty"
    )
    return {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "tokenizer": tokenizer.manifest(),
        "dtype": tokenizer.dtype.name,
        "documents": docs,
        "tokens": ntok,
        "skipped_empty": skipped,
        "splits": {s: asdict(st) for s, st in stats.items() if st.documents},
        "sources": [str(f) for f in files],
        "input_format": fmt,
        "seed": opts.seed,
        "valid_fraction": opts.valid_fraction,
    }


def _tokenize_into(writers: dict, opts, files: list[Path], fmt: str, tokenizer: CorpusTokenizer) -> tuple[int, int]:
    """Every document of `files`, tokenized in batches (by `opts.workers` processes) and sent to
    the train or valid writer by the seeded split; (documents, empty ones skipped)."""
    from tqdm import tqdm

    total, unit = progress_total(files, fmt)
    bar = tqdm(total=total, unit=unit, unit_scale=True, disable=not opts.progress, file=sys.stderr,
               desc="prepare", mininterval=1.0, dynamic_ncols=True)
    counters = {"docs": 0, "skipped_empty": 0}
    t0 = time.perf_counter()

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for f in files:
            for text, units in read_documents(f, fmt, opts.field, opts.text_mode):
                bar.update(units)
                if not text.strip():
                    counters["skipped_empty"] += 1
                    continue
                batch.append(text)
                if len(batch) == BATCH_DOCS:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def consume(results) -> None:
        tokens_done = 0
        for flat, lengths in results:
            idx = np.arange(counters["docs"], counters["docs"] + len(lengths))
            is_valid = valid_mask(idx, opts.valid_fraction, opts.seed)
            ends = np.cumsum(lengths)
            starts = ends - lengths
            for split, m in (("train", ~is_valid), ("valid", is_valid)):
                if m.all():
                    writers[split].add(flat, lengths)
                elif m.any():
                    sel = np.concatenate([flat[s:e] for s, e in zip(starts[m], ends[m], strict=True)])
                    writers[split].add(sel, lengths[m])
            counters["docs"] += len(lengths)
            tokens_done += int(flat.size)
            rate = tokens_done / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(docs=counters["docs"], tokens=tokens_done, tok_s=f"{rate:,.0f}", refresh=False)

    init_args = (opts.tokenizer, tokenizer.eos_id, tokenizer.dtype.str)
    if opts.workers == 1:
        _init_worker(*init_args)
        consume(map(_tokenize_batch, batches()))
    else:
        import multiprocessing as mp

        # fork: workers start fast and share nothing mutable; the tokenizer is
        # loaded after the fork so no Rust thread pool crosses it.
        ctx = mp.get_context("fork")
        with ctx.Pool(opts.workers, initializer=_init_worker, initargs=init_args) as pool:
            consume(pool.imap(_tokenize_batch, batches(), chunksize=1))
    bar.close()
    return counters["docs"], counters["skipped_empty"]


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _publish(stage: Path, out: Path) -> None:
    """Move a finished corpus into place; an older corpus there goes only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(stage, out)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prepare(args: argparse.Namespace) -> int:
    opts = PrepareOptions(
        inputs=args.inputs,
        tokenizer=resolve_path(args.tokenizer, field="--tokenizer"),
        out=args.out,
        format=args.format,
        field=args.field,
        text_mode=args.text_mode,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        valid_fraction=args.valid_fraction,
        seed=args.seed,
        eos_token=args.eos_token,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    manifest = prepare_corpus(opts)
    for name, split in manifest["splits"].items():
        print(
            f"  {name}: {split['documents']:,} documents, {split['tokens']:,} tokens, {len(split['shards'])} shard(s)"
        )
    print(f"corpus written to {args.out}  (inspect: hpctrain corpus inspect {args.out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    pr = argparse.ArgumentParser(prog="hpctrain prepare",
                                 description="tokenize raw text into a Megatron-format token corpus")
    pr.add_argument(
        "inputs", nargs="+", help="input files or globs (text, jsonl, csv, parquet, datasets dir)"
    )
    pr.add_argument(
        "--tokenizer",
        required=True,
        help="local Hugging Face tokenizer directory (or pkg:PACKAGE/dir)",
    )
    pr.add_argument("--out", required=True, help="output corpus directory")
    pr.add_argument(
        "--format", default="auto", help="auto | text | jsonl | csv | parquet | datasets"
    )
    pr.add_argument(
        "--field", default="text", help="JSON field / column holding the text (default: text)"
    )
    pr.add_argument(
        "--text-mode", default="line", help="plain text: 'line' (a document per line) or 'file'"
    )
    pr.add_argument(
        "--workers", type=int, default=1, help="tokenizer processes (output is identical for any N)"
    )
    pr.add_argument(
        "--shard-tokens", type=int, default=1_000_000_000, help="tokens per shard (default 1e9)"
    )
    pr.add_argument(
        "--valid-fraction", type=float, default=0.0, help="share of documents for validation"
    )
    pr.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split")
    pr.add_argument(
        "--eos-token",
        default=None,
        help="token appended after each document (default: EOS, else SEP)",
    )
    pr.add_argument(
        "--overwrite", action="store_true", help="replace a different corpus already at --out"
    )
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    args = pr.parse_args(argv)
    return run_command(lambda: _prepare(args))


if __name__ == "__main__":
    sys.exit(main())
