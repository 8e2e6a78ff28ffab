"""`hpctrain prepare` end to end: real tokenizer, real files, the CLI's exit codes."""

from __future__ import annotations

import csv
import filecmp
import json
from pathlib import Path

import numpy as np
import pytest

from hpctrain.launcher.contract.corpus import open_corpus
from tests.conftest import EXAMPLE_TEXT, run_cli

DOCS = [line for line in EXAMPLE_TEXT.read_text().splitlines() if line.strip()]


def _decode_all(corpus_dir: str, tokenizer: str, split: str = "train") -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    stream = open_corpus(corpus_dir).split(split)
    out = []
    for f in stream.files:
        for i in range(f.num_documents):
            ids = f.document(i).tolist()
            assert ids[-1] == tok.eos_token_id
            out.append(tok.decode(ids[:-1]))
    return out


def test_text_round_trip_decodes_to_the_input_documents(tmp_path, bpe_tokenizer):
    r = run_cli(
        "prepare",
        str(EXAMPLE_TEXT),
        "--tokenizer",
        bpe_tokenizer,
        "--out",
        str(tmp_path / "c"),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "prepared 600 documents" in r.stdout
    assert _decode_all(str(tmp_path / "c"), bpe_tokenizer) == DOCS
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["documents"] == 600
    assert m["tokenizer"]["eos_token"] == "<|endoftext|>"
    assert m["tokenizer"]["vocab_size"] == 600


def test_every_input_format_gives_the_same_tokens(tmp_path, bpe_tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = DOCS[:50]
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs))
    )
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        w.writerows([i, d] for i, d in enumerate(docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
    for name in ("a.jsonl", "a.csv", "a.parquet", "ds"):
        out = tmp_path / f"out-{name}"
        r = run_cli(
            "prepare",
            str(tmp_path / name),
            "--field",
            "body",
            "--tokenizer",
            bpe_tokenizer,
            "--out",
            str(out),
            "--quiet",
        )
        assert r.returncode == 0, (name, r.stderr)
        assert _decode_all(str(out), bpe_tokenizer) == docs, name


def test_globs_shards_and_validation_split(tmp_path, bpe_tokenizer):
    for k in range(3):
        (tmp_path / f"part{k}.txt").write_text("\n".join(DOCS[k * 200 : (k + 1) * 200]) + "\n")
    out = tmp_path / "c"
    r = run_cli(
        "prepare",
        str(tmp_path / "part*.txt"),
        "--tokenizer",
        bpe_tokenizer,
        "--out",
        str(out),
        "--shard-tokens",
        "3000",
        "--valid-fraction",
        "0.1",
        "--seed",
        "5",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["splits"]["train"]["shards"]) > 3
    assert 30 < m["splits"]["valid"]["documents"] < 100
    train, valid = (
        _decode_all(str(out), bpe_tokenizer),
        _decode_all(str(out), bpe_tokenizer, "valid"),
    )
    assert sorted(train + valid) == sorted(DOCS)
    assert set(train).isdisjoint(valid)


def test_output_is_identical_for_any_number_of_workers(tmp_path, bpe_tokenizer):
    outs = []
    for n in (1, 2, 3):
        out = tmp_path / f"w{n}"
        r = run_cli(
            "prepare",
            str(EXAMPLE_TEXT),
            "--tokenizer",
            bpe_tokenizer,
            "--out",
            str(out),
            "--workers",
            str(n),
            "--valid-fraction",
            "0.2",
            "--shard-tokens",
            "5000",
            "--quiet",
        )
        assert r.returncode == 0, r.stderr
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    for other in outs[1:]:
        assert sorted(p.name for p in other.iterdir()) == names
        match, mismatch, errors = filecmp.cmpfiles(outs[0], other, names, shallow=False)
        assert mismatch == [] and errors == []


def test_same_corpus_again_is_a_no_op_and_a_different_one_is_refused(tmp_path, bpe_tokenizer):
    out = str(tmp_path / "c")
    args = ["prepare", str(EXAMPLE_TEXT), "--tokenizer", bpe_tokenizer, "--out", out, "--quiet"]
    assert run_cli(*args).returncode == 0
    r = run_cli(*args)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = run_cli(*args, "--valid-fraction", "0.5")
    assert r.returncode == 2
    assert "already holds a different corpus" in r.stderr and "--overwrite" in r.stderr
    r = run_cli(*args, "--valid-fraction", "0.5", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "valid" in json.loads(Path(out, "manifest.json").read_text())["splits"]


@pytest.mark.parametrize(
    "setup, extra, message",
    [
        (lambda d: None, [], "no such file"),
        (
            lambda d: (d / "in.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n'),
            [],
            "line 2 has no field 'text'",
        ),
        (
            lambda d: (d / "in.jsonl").write_text('{"text": "a"}\n{oops\n'),
            [],
            "line 2 is not valid JSON",
        ),
        (lambda d: (d / "in.csv").write_text("a,b\n1,2\n"), [], "no column 'text'"),
        (lambda d: (d / "in.txt").write_text("\n\n  \n"), [], "hold no document"),
        (
            lambda d: (d / "in.txt").write_text("hello\n"),
            ["--tokenizer-override"],
            "no tokenizer here",
        ),
    ],
    ids=["missing", "json-field", "bad-json", "csv-column", "empty", "bad-tokenizer"],
)
def test_bad_inputs_exit_2_with_a_message_and_leave_nothing(
    tmp_path, bpe_tokenizer, setup, extra, message
):
    setup(tmp_path)
    inputs = [str(p) for p in tmp_path.iterdir()] or [str(tmp_path / "missing.txt")]
    tok = str(tmp_path) if extra == ["--tokenizer-override"] else bpe_tokenizer
    out = tmp_path / "out"
    r = run_cli("prepare", *inputs, "--tokenizer", tok, "--out", str(out), "--quiet")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_failure_midway_leaves_no_corpus_that_looks_complete(tmp_path, bpe_tokenizer):
    good = "".join(json.dumps({"text": d}) + "\n" for d in DOCS)
    (tmp_path / "a.jsonl").write_text(good)
    (tmp_path / "b.jsonl").write_text(good + '{"other": 1}\n')
    out = tmp_path / "out"
    r = run_cli(
        "prepare",
        str(tmp_path / "*.jsonl"),
        "--tokenizer",
        bpe_tokenizer,
        "--out",
        str(out),
        "--workers",
        "2",
        "--quiet",
    )
    assert r.returncode == 2 and "b.jsonl" in r.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_non_empty_directory_without_corpus_is_refused(tmp_path, bpe_tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = run_cli(
        "prepare",
        str(EXAMPLE_TEXT),
        "--tokenizer",
        bpe_tokenizer,
        "--out",
        str(out),
        "--quiet",
        "--overwrite",
    )
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_inspect_shows_counts_tokenizer_samples_and_histogram(tmp_path, bpe_tokenizer):
    out = tmp_path / "c"
    assert (
        run_cli(
            "prepare", str(EXAMPLE_TEXT), "--tokenizer", bpe_tokenizer, "--out", str(out), "--quiet"
        ).returncode
        == 0
    )
    r = run_cli("corpus", "inspect", str(out), "--samples", "2")
    assert r.returncode == 0, r.stderr
    assert "documents: 600" in r.stdout and "dtype: uint16" in r.stdout
    assert DOCS[0][:60] in r.stdout
    assert "#" in r.stdout  # the histogram
    r = run_cli("corpus", "inspect", str(tmp_path / "nope"))
    assert r.returncode == 2 and "corpus not found" in r.stderr


def test_hostile_output_path_works(weird_tmp_path, bpe_tokenizer):
    out = weird_tmp_path / "corpus dir"
    r = run_cli(
        "prepare", str(EXAMPLE_TEXT), "--tokenizer", bpe_tokenizer, "--out", str(out), "--quiet"
    )
    assert r.returncode == 0, r.stderr
    assert (
        open_corpus(out).split().num_tokens
        == json.loads((out / "manifest.json").read_text())["tokens"]
    )
    assert np.all(open_corpus(out).split().read(0, 5) < 600)
