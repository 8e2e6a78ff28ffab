"""`hpctrain corpus inspect PATH`: counts, dtype, tokenizer, decoded samples, length histogram."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from hpctrain.launcher.contract.corpus import open_corpus
from hpctrain.launcher.contract.errors import run_command


def length_histogram(lengths: np.ndarray, bins: int = 8, width: int = 40) -> list[str]:
    """Text histogram of document lengths on log2-spaced bins."""
    if len(lengths) == 0:
        return ["(no documents)"]
    lo, hi = max(int(lengths.min()), 1), max(int(lengths.max()), 1)
    edges = np.unique(np.geomspace(lo, hi + 1, bins + 1).astype(np.int64))
    if len(edges) < 2:
        edges = np.array([lo, hi + 1])
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    rows = []
    for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True):
        bar = "#" * max(int(round(width * c / top)), 1 if c else 0)
        rows.append(f"  {a:>8}-{b - 1:<8} {c:>9,}  {bar}")
    return rows


def document_lengths(f) -> np.ndarray:
    """Tokens per document (a Megatron document may hold several sequences)."""
    if f.num_documents == 0:
        return np.zeros(0, np.int64)
    return np.add.reduceat(f.sequence_lengths.astype(np.int64), f.document_indices[:-1])


def inspect_corpus(
    path: str, samples: int = 3, tokenizer: str | None = None, chars: int = 200
) -> str:
    corpus = open_corpus(path)
    m = corpus.manifest
    lines = [f"corpus: {corpus.path}"]
    tok_path = tokenizer
    if m is not None:
        t = m["tokenizer"]
        lines += [
            f"tokenizer: {t['path']} ({t['class']}, vocab {t['vocab_size']:,}, eos {t['eos_token']!r}={t['eos_id']}, sha256 {t['sha256'][:12]})",
            f"dtype: {m['dtype']}   documents: {m['documents']:,}   tokens: {m['tokens']:,}   skipped empty: {m['skipped_empty']}",
            f"sources: {len(m['sources'])} file(s) ({m['input_format']})",
        ]
        tok_path = tok_path or t["path"]
        split_names = list(m["splits"])
    else:
        lines.append("format: bare Megatron indexed dataset (no manifest)")
        split_names = ["train"]
    tok = None
    if tok_path:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
        except (OSError, ValueError) as e:
            lines.append(f"(tokenizer not loadable, showing ids: {e})")
    for name in split_names:
        stream = corpus.split(name)
        lengths = np.concatenate([document_lengths(f) for f in stream.files])
        lines.append(
            f"\nsplit {name}: {len(stream.files)} shard(s), {stream.num_documents:,} documents, "
            f"{stream.num_tokens:,} tokens, dtype {stream.dtype}"
        )
        lines.append(
            f"  document length: min {lengths.min()} / median {int(np.median(lengths))} / max {lengths.max()} tokens"
        )
        lines += length_histogram(lengths)
        first = stream.files[0]
        for i in range(min(samples, first.num_documents)):
            ids = first.document(i)
            text = (
                tok.decode(ids.tolist())
                if tok is not None
                else " ".join(map(str, ids[:64].tolist()))
            )
            text = text.replace("\n", "\\n")
            lines.append(
                f"  doc {i} ({len(ids)} tokens): {text[:chars]}{'...' if len(text) > chars else ''}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hpctrain corpus inspect",
                                 description="counts, dtype, tokenizer, samples, length histogram")
    ap.add_argument("path", help="corpus directory or Megatron .bin/.idx prefix")
    ap.add_argument("--samples", type=int, default=3, help="documents to decode and show")
    ap.add_argument("--tokenizer", default=None, help="tokenizer to decode with (default: the manifest's)")
    args = ap.parse_args(argv)
    return run_command(lambda: print(inspect_corpus(args.path, samples=args.samples, tokenizer=args.tokenizer)))


if __name__ == "__main__":
    sys.exit(main())
