"""Checks that need the file system: everything that can fail before a job waits in a queue."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hpctrain.launcher.contract.corpus import MANIFEST, read_manifest, token_id_problem
from hpctrain.launcher.contract.errors import UserError, UserErrors
from hpctrain.launcher.contract.indexed import FormatError
from hpctrain.launcher.contract.paths import TOKENIZER_VOCABS, resolve_path, tokenizer_fingerprint
from hpctrain.launcher.contract.records import iter_records
from hpctrain.launcher.contract.spec import RunSpec
from hpctrain.launcher.model_files import check_model_type, model_dir_problems


def _manifest(path: str, field: str, file: str | None, errors: list[UserError]) -> dict | None:
    p = Path(path)
    if p.is_dir():
        m = p / MANIFEST
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
        try:
            manifest = read_manifest(p)  # the trainers' reader: what it refuses, validate refuses
        except (FormatError, ValueError, UnicodeDecodeError) as e:
            errors.append(UserError(f"manifest.json does not parse ({str(getattr(e, 'message', e))[:200]})", file=str(m), field=field,
                                    expected="the manifest `hpctrain prepare` writes (prepare the corpus again)"))
            return None
        return manifest
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


def _read_examples(path: str, spec: RunSpec, spec_field: str, errors: list[UserError],
                   limit: int = 3) -> list[dict] | None:
    """The records of one fine-tuning file with the fields every record needs; problems
    (empty file, missing column or field) go to `errors`. None when unreadable or empty."""
    ft = spec.finetune
    try:
        rows = list(iter_records(path, ft.tsv_columns()))
    except UserError as e:
        errors.append(e)
        return None
    if not rows:
        errors.append(UserError("no examples (an empty file, or a header without rows)", file=path,
                                field=spec_field, expected="at least one example"))
        return None
    need = ft.csv_columns()
    if Path(path).suffix.lower() == ".csv" and need:  # a missing column is one error, not one per row
        columns = list(rows[0][1])
        missing = [c for c in need if c not in columns]
        if missing:
            errors.append(UserError(f"no column {', '.join(repr(c) for c in missing)} (columns: {columns})",
                                    file=path, field=spec_field,
                                    expected=f"the columns named by finetune ({', '.join(need)})"))
            return None
    found = 0
    for n, rec in rows:
        for name in ft.record_fields(rec):
            if rec.get(name) in (None, ""):
                errors.append(UserError(f"line {n} has no field '{name}' (has {sorted(rec)})",
                                        file=path, field=spec_field))
                found += 1
        problem = None if found else ft.record_problem(rec)
        if problem is not None:
            errors.append(UserError(f"line {n}: {problem}", file=path, field=spec_field))
            found += 1
        if found >= limit:
            return None
    return None if found else [rec for _, rec in rows]


def finetune_report(spec: RunSpec, errors: list[UserError]) -> tuple[list[str], int | None]:
    """Read the fine-tuning files far enough to count examples and labels (no torch).

    Returns notes for `validate` and the number of training examples in one epoch
    (None when it is known only after tokenizing: packed SFT).
    """
    ft = spec.finetune
    notes: list[str] = []
    sets: dict[str, list[dict] | None] = {}  # spec field -> its examples
    files = [("finetune.train_file", ft.train_file)] + [(field, raw) for _, raw, field in ft.valid_sets()]
    for field, raw in files:
        path = resolve_path(raw)
        if not Path(path).is_file():
            errors.append(UserError(f"file not found ({raw})", field=field,
                                    expected="a JSONL, CSV or TSV file of examples"))
            continue
        sets[field] = _read_examples(path, spec, field, errors)
    train = sets.get("finetune.train_file")
    if train is None:
        return notes, None
    n_train = len(train)
    if ft.valid_file is None:
        from hpctrain.launcher.contract.split import split_indices  # the trainer's split

        held = len(split_indices(n_train, ft.valid_fraction, spec.training.seed)[1])
        n_train -= held
        notes.append(f"finetune.train_file: {len(train):,} examples ({held} held out for validation)")
    else:
        notes.append(f"finetune.train_file: {n_train:,} examples")
    notes += ft.check_examples(train, sets, errors)
    for _, _, field in ft.valid_sets():
        if sets.get(field) is not None:
            notes.append(f"{field.removesuffix('.path')}: {len(sets[field]):,} examples")
    return notes, (n_train if ft.epoch_known_from_files() else None)


def check_files(
    spec: RunSpec, file: str | None = None, future: set[str] | None = None
) -> tuple[list[str], int | None]:
    """Raise UserErrors listing every problem; return notes (what was checked) and the
    samples in one epoch of training data (None where only the trainer can count them).

    One checker per section, each adding to the same lists so that a spec is fixed in one pass.
    `future`: paths an earlier pipeline stage will produce (checked when that stage is done).
    """
    errors: list[UserError] = []
    notes: list[str] = []
    pending = spec.model.path is not None and spec.model.path in (future or set())
    try:
        model_path = _check_model(spec, file, pending, errors, notes)
        tok_path = resolve_path(spec.model.tokenizer_path, field="model.tokenizer", file=file)
    except UserError as e:
        raise UserErrors([e]) from None
    tok_hash = _check_tokenizer(spec, file, tok_path, pending, errors)
    samples: int | None = None
    if spec.finetune is not None:
        _check_other_models(spec, file, future or set(), errors, notes)
        if spec.finetune.trains.partial and not pending and not errors:
            notes += _check_freeze(spec, errors)
        for field, problem in spec.finetune.import_problems():
            errors.append(UserError(problem, file=file, field=field,
                                    expected="module:function, the module importable from here or PYTHONPATH"))
        ft_notes, samples = finetune_report(spec, errors)
        notes += ft_notes
    if spec.data is not None:
        samples = _check_corpora(spec, file, tok_path, tok_hash, _model_vocab(spec, model_path), errors, notes)
    _check_wandb(spec, file, errors, notes)
    _check_engine(spec, file, errors)
    if spec.cluster.executor == "slurm":
        from hpctrain.launcher.container import check_container
        from hpctrain.launcher.cpus import cpu_notes

        notes += cpu_notes(spec)
        check_container(spec, file, errors, notes)
    _check_writable(spec, file, errors)
    if errors:
        raise UserErrors(errors)
    return notes, samples


def _check_freeze(spec: RunSpec, errors: list[UserError]) -> list[str]:
    """method freeze: the blocks and regexes it names, against the model built on the meta
    device (`plan`'s parameter count, in a subprocess: nothing allocated, no weights read)."""
    from hpctrain.launcher.plan import model_size

    try:
        m = model_size(spec)
    except UserError as e:
        errors.append(e)
        return []
    return [f"finetune.freeze: {m.trainable:,} of {m.total:,} parameters trained "
            f"({100 * m.trainable / max(m.total, 1):.1f}%)"]


def _check_model(spec: RunSpec, file: str | None, pending: bool, errors: list[UserError],
                 notes: list[str]) -> str | None:
    """model.path (a model folder whose weights load safely) or model.config; its path."""
    if pending:
        notes.append(f"model.path: {spec.model.path} (written by an earlier stage)")
    model_path = None
    if spec.model.path is not None and not pending:
        model_path = resolve_path(spec.model.path, field="model.path", file=file)
        if not (Path(model_path) / "config.json").is_file():
            errors.append(UserError(f"no model here ({model_path})", file=file, field="model.path",
                                    expected="a Hugging Face model directory with config.json"))
        else:
            errors += model_dir_problems(Path(model_path), file)
            errors += _kind_model_problems(spec, Path(model_path) / "config.json")
    if spec.model.config is not None:
        bad = check_model_type(spec.model.config.get("model_type"), "model.config.model_type", file)
        if bad is not None:
            errors.append(bad)
        elif spec.task == "finetune" and spec.finetune.architecture_problem(spec.model.config):
            errors.append(UserError(spec.finetune.architecture_problem(spec.model.config), file=file,
                                    field="model.config.model_type",
                                    expected=f"a model fit for kind {spec.finetune.kind}"))
    return model_path


def _check_other_models(spec: RunSpec, file: str | None, future: set[str], errors: list[UserError],
                        notes: list[str]) -> None:
    """The models a kind loads besides `model.path` (GRPO's reward model), checked as it is."""
    for field, raw in spec.finetune.other_models():
        if raw in future:
            notes.append(f"{field}: {raw} (written by an earlier stage)")
            continue
        try:
            path = Path(resolve_path(raw, field=field, file=file))
        except UserError as e:
            errors.append(e)
            continue
        config_file = path / "config.json"
        if not config_file.is_file():
            errors.append(UserError(f"no model here ({path})", file=file, field=field,
                                    expected="a Hugging Face model directory with config.json"))
            continue
        errors += model_dir_problems(path, file)
        try:
            config = json.loads(config_file.read_text())
        except (ValueError, UnicodeDecodeError):
            continue  # said already (model_dir_problems)
        problem = spec.finetune.other_model_problem(field, config) if isinstance(config, dict) else None
        if problem:
            errors.append(UserError(problem, file=str(config_file), field=field,
                                    expected=f"a model fit for {field}"))


def _kind_model_problems(spec: RunSpec, config_file: Path) -> list[UserError]:
    """What the fine-tuning kind says of the model (a reward model's head must be one output)."""
    if spec.task != "finetune":
        return []
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError):
        return []  # said already (model_dir_problems)
    ft = spec.finetune
    problem = (ft.architecture_problem(config) or ft.model_problem(config)) if isinstance(config, dict) else None
    return [UserError(problem, file=str(config_file), field="model.path",
                      expected=f"a model fit for kind {spec.finetune.kind}")] if problem else []


def _check_tokenizer(spec: RunSpec, file: str | None, tok_path: str, pending: bool,
                     errors: list[UserError]) -> str | None:
    """The tokenizer folder and its files; its fingerprint (what corpora are compared with)."""
    tok_field = "model.tokenizer" if spec.model.tokenizer else "model.path"
    if pending and tok_path == spec.model.path:
        return None  # the export will carry the tokenizer
    if not Path(tok_path).is_dir():
        errors.append(UserError(f"tokenizer directory not found ({tok_path})", file=file, field=tok_field))
        return None
    if not any((Path(tok_path) / f).is_file() for f in TOKENIZER_VOCABS):
        errors.append(UserError(f"no tokenizer files in {tok_path}", file=file, field=tok_field,
                                expected=f"a Hugging Face tokenizer directory (one of {', '.join(TOKENIZER_VOCABS)})"))
        return None
    tok_json = Path(tok_path) / "tokenizer.json"
    try:
        if tok_json.is_file():
            json.loads(tok_json.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        errors.append(UserError(f"tokenizer.json does not parse ({str(e)[:200]})", file=str(tok_json),
                                field=tok_field))
    return tokenizer_fingerprint(tok_path)


def _check_corpora(spec: RunSpec, file: str | None, tok_path: str, tok_hash: str | None, vocab: int | None,
                   errors: list[UserError], notes: list[str]) -> int | None:
    """Every training and validation corpus: its shards, split, tokenizer, token ids and size;
    the packed samples in one epoch (None when a corpus could not be counted)."""
    refs = [(f"data.corpora.{i}.path", c.path, c.split) for i, c in enumerate(spec.data.corpora)]
    refs += [(v.field, v.path, v.split) for v in spec.data.validation_sets()]
    checked: set[str] = set()
    train_tokens: dict[str, int] = {}
    for field, raw, split in refs:
        path = resolve_path(raw, field=field, file=file)
        m = _manifest(path, field, file, errors)
        if path not in checked and (m is not None or Path(path + ".idx").is_file()):
            checked.add(path)
            from hpctrain.launcher.contract.corpus import corpus_problems  # stat-only shard checks

            for e in corpus_problems(path, m):
                e.field = e.field or field
                errors.append(e)
        if m is None:
            if field.startswith("data.corpora") and Path(path + ".idx").is_file():
                from hpctrain.launcher.contract.indexed import FormatError, shard_counts

                try:
                    train_tokens[field] = shard_counts(path)[0]
                except FormatError:
                    pass  # reported above
            continue
        tokens = _check_split(spec, file, field, split, m, tok_path, tok_hash, vocab, errors)
        if tokens is not None:
            notes.append(f"{field}: {tokens:,} tokens in '{split}'")
            if field.startswith("data.corpora"):
                train_tokens[field] = tokens
    if len(train_tokens) != len(spec.data.corpora):
        return None
    per = [max((n - 1) // spec.data.seq_len, 0) for n in train_tokens.values()]
    samples = sum(per)
    if spec.training.epochs is not None:
        w = [c.weight for c in spec.data.corpora]
        passes = [f"{spec.training.epochs * samples * wi / sum(w) / max(n, 1):.2f}"
                  for wi, n in zip(w, per, strict=True)]
        notes.append(f"one epoch = {samples:,} packed samples (all corpora); passes over each corpus: "
                     + ", ".join(passes))
    return samples


def _check_split(spec: RunSpec, file: str | None, field: str, split: str, m: dict, tok_path: str,
                 tok_hash: str | None, vocab: int | None, errors: list[UserError]) -> int | None:
    """One split of a prepared corpus against the run: its tokens (None when it is missing)."""
    if split not in m.get("splits", {}):
        errors.append(UserError(f"corpus has no split '{split}' (has {sorted(m.get('splits', {}))})",
                                file=file, field=field))
        return None
    mtok = m["tokenizer"]
    if tok_hash is not None and mtok.get("sha256") != tok_hash:
        errors.append(UserError(f"corpus was tokenized with a different tokenizer ({mtok.get('path')})",
                                file=file, field=field, expected=f"a corpus prepared with {tok_path}"))
    top = m["splits"][split].get("max_token_id", mtok.get("vocab_size", 0) - 1)
    problem = token_id_problem(top, vocab, split, file, field) if vocab is not None else None
    if problem is not None:
        errors.append(problem)
    tokens = m["splits"][split]["tokens"]
    if tokens <= spec.data.seq_len + 1:
        errors.append(UserError(f"split '{split}' has {tokens} tokens, too few for seq_len {spec.data.seq_len}",
                                file=file, field=field))
    return tokens


def _check_wandb(spec: RunSpec, file: str | None, errors: list[UserError], notes: list[str]) -> None:
    """W&B installed where asked; a warning where online mode has no key."""
    wb = spec.monitor.wandb
    if wb.mode == "disabled":
        return
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        errors.append(UserError("W&B is not installed", file=file, field="monitor.wandb.mode",
                                expected="the extra (bash tools/setup.sh examples,wandb) or mode: disabled"))
    elif wb.mode == "online" and not os.environ.get("WANDB_API_KEY") and not _netrc_has_wandb():
        notes.append("warning: monitor.wandb.mode is online but no W&B key is set (WANDB_API_KEY or "
                     "`wandb login`): W&B will be off and metrics.jsonl the only record; "
                     "mode: offline needs no key (upload later with hpctrain sync)")
    else:
        notes.append(f"W&B: {wb.mode}, project {wb.project or spec.name}"
                     + (f", group {wb.group}" if wb.group else ""))


def _check_engine(spec: RunSpec, file: str | None, errors: list[UserError]) -> None:
    """DeepSpeed installed where asked, and its config complete for this run."""
    if spec.engine.type != "deepspeed":
        return
    import importlib.util

    from hpctrain.launcher.contract.ds_config import build_ds_config

    if importlib.util.find_spec("deepspeed") is None:
        errors.append(UserError("DeepSpeed is not installed", file=file, field="engine.type",
                                expected="the extra: bash tools/setup.sh examples,deepspeed"))
    try:
        build_ds_config(spec, spec.cluster.world_size, file)
    except UserErrors as e:
        errors += e.errors
    except UserError as e:
        errors.append(e)


def _check_writable(spec: RunSpec, file: str | None, errors: list[UserError]) -> None:
    """The run dir, or the nearest folder above it that exists, takes a file."""
    run = Path(spec.run_path)
    probe = run if run.exists() else next((p for p in run.parents if p.exists()), Path("."))
    try:
        if not probe.is_dir():
            raise PermissionError
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".hpctrain-write-test")
        os.close(fd)
        os.unlink(tmp)
    except OSError:
        errors.append(UserError(f"not writable ({probe})", file=file, field="run_dir"))


def _netrc_has_wandb() -> bool:
    """Whether `wandb login` left a key in ~/.netrc (or $NETRC)."""
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in path.read_text()
    except OSError:
        return False
