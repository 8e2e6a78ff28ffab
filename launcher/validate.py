"""Checks that need the file system: everything that can fail before a job waits in a queue."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from launcher.errors import UserError, UserErrors
from launcher.paths import resolve_path, tokenizer_fingerprint
from launcher.records import iter_records
from launcher.spec import RunSpec


def _manifest(path: str, field: str, file: str | None, errors: list[UserError]) -> dict | None:
    p = Path(path)
    if p.is_dir():
        m = p / "manifest.json"
        if not m.is_file():
            errors.append(
                UserError(
                    "no manifest.json: not a prepared corpus",
                    file=file,
                    field=field,
                    expected=f"a corpus directory from `hpctrain prepare` ({p})",
                )
            )
            return None
        return json.loads(m.read_text())
    if Path(path + ".idx").is_file() and Path(path + ".bin").is_file():
        return None  # a bare Megatron prefix: no manifest to compare
    errors.append(
        UserError(
            f"corpus not found: {p}",
            file=file,
            field=field,
            expected="a corpus directory or a Megatron .bin/.idx prefix",
        )
    )
    return None


def _model_vocab(spec: RunSpec, model_path: str | None) -> int | None:
    if spec.model.config is not None:
        return spec.model.config.get("vocab_size")
    if model_path is None:
        return None
    cfg = Path(model_path) / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("vocab_size")
    return None


def example_problems(path: str, spec: RunSpec, limit: int = 3) -> list[UserError]:
    """Fields every fine-tuning record needs, checked before anything starts (no torch)."""
    ft = spec.finetune
    problems: list[UserError] = []
    try:
        for n, rec in iter_records(path):
            if ft.kind == "classify":
                fields = [ft.text_field, ft.label_field]
            elif ft.messages_field in rec:
                fields = [ft.messages_field]
            else:
                fields = [ft.prompt_field, ft.response_field]
            for name in fields:
                if rec.get(name) in (None, ""):
                    problems.append(UserError(f"line {n} has no field '{name}' (has {sorted(rec)})",
                                              file=path, field="finetune"))
            if len(problems) >= limit:
                break
    except UserError as e:
        problems.append(e)
    return problems


def check_files(spec: RunSpec, file: str | None = None, future: set[str] | None = None) -> list[str]:
    """Raise UserErrors listing every problem; return notes (e.g. what was checked).

    `future`: paths an earlier pipeline stage will produce (checked when that stage is done).
    """
    errors: list[UserError] = []
    notes: list[str] = []
    model_path = None
    pending = spec.model.path is not None and spec.model.path in (future or set())
    if pending:
        notes.append(f"model.path: {spec.model.path} (written by an earlier stage)")
    try:
        if spec.model.path is not None and not pending:
            model_path = resolve_path(spec.model.path, field="model.path", file=file)
            if not (Path(model_path) / "config.json").is_file():
                errors.append(
                    UserError(
                        f"no model here ({model_path})",
                        file=file,
                        field="model.path",
                        expected="a Hugging Face model directory with config.json",
                    )
                )
        tok_path = resolve_path(spec.model.tokenizer_path, field="model.tokenizer", file=file)
    except UserError as e:
        raise UserErrors([e]) from None
    tok_field = "model.tokenizer" if spec.model.tokenizer else "model.path"
    tok_hash = None
    if pending and tok_path == spec.model.path:
        pass  # the export will carry the tokenizer
    elif not Path(tok_path).is_dir():
        errors.append(
            UserError(f"tokenizer directory not found ({tok_path})", file=file, field=tok_field)
        )
    else:
        tok_hash = tokenizer_fingerprint(tok_path)
    vocab = _model_vocab(spec, model_path)

    refs = []
    if spec.finetune is not None:
        for field in ("train_file", "valid_file"):
            raw = getattr(spec.finetune, field)
            if raw is None:
                continue
            if not Path(resolve_path(raw)).is_file():
                errors.append(UserError(f"file not found ({raw})", file=file, field=f"finetune.{field}",
                                        expected="a JSONL or CSV file of examples"))
            else:
                errors += example_problems(resolve_path(raw), spec)
    if spec.data is not None:
        refs = [(f"data.corpora.{i}.path", c.path, c.split) for i, c in enumerate(spec.data.corpora)]
    if spec.data is not None and spec.data.validation is not None:
        refs.append(("data.validation.path", spec.data.validation.path, spec.data.validation.split))
    for field, raw, split in refs:
        path = resolve_path(raw, field=field, file=file)
        m = _manifest(path, field, file, errors)
        if m is None:
            continue
        if split not in m.get("splits", {}):
            errors.append(
                UserError(
                    f"corpus has no split '{split}' (has {sorted(m.get('splits', {}))})",
                    file=file,
                    field=field,
                )
            )
            continue
        mtok = m["tokenizer"]
        if tok_hash is not None and mtok.get("sha256") != tok_hash:
            errors.append(
                UserError(
                    f"corpus was tokenized with a different tokenizer ({mtok.get('path')})",
                    file=file,
                    field=field,
                    expected=f"a corpus prepared with {tok_path}",
                )
            )
        top = m["splits"][split].get("max_token_id", mtok.get("vocab_size", 0) - 1)
        if vocab is not None and top >= vocab:
            errors.append(
                UserError(
                    f"corpus holds token id {top} but the model's vocab size is {vocab}",
                    file=file,
                    field=field,
                    expected="model vocab_size > every token id",
                )
            )
        tokens = m["splits"][split]["tokens"]
        if tokens <= spec.data.seq_len + 1:
            errors.append(
                UserError(
                    f"split '{split}' has {tokens} tokens, too few for seq_len {spec.data.seq_len}",
                    file=file,
                    field=field,
                )
            )
        notes.append(f"{field}: {tokens:,} tokens in '{split}'")

    run = Path(spec.run_path)
    probe = run if run.exists() else next((p for p in run.parents if p.exists()), Path("."))
    try:
        if probe.is_dir():
            fd, tmp = tempfile.mkstemp(dir=probe, prefix=".hpctrain-write-test")
            os.close(fd)
            os.unlink(tmp)
        else:
            raise PermissionError
    except OSError:
        errors.append(UserError(f"not writable ({probe})", file=file, field="run_dir"))
    if errors:
        raise UserErrors(errors)
    return notes
