"""`hpctrain sweep SPEC --over KEY=V1,V2,... [--over ...]`: one run per point of the grid.

Every point is the spec with its values set (as `--set` would), in a run dir of its own under
the spec's run dir, named by the values (`runs/NAME/weight=0.3`); each is an ordinary run:
resumable, preemptible, locked, with its own status. The sweep dir holds `sweep.json`: the
points, their values and run dirs, which `--report`, `status` and `plot` read. Every point is
validated before any runs or is submitted.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from hpctrain.launcher.contract.errors import UserError, UserErrors
from hpctrain.launcher.contract.rundir import metrics_records, validation_losses
from hpctrain.launcher.contract.spec import (
    RunSpec,
    apply_overrides,
    load_spec_dict,
    spec_from_dict,
    with_absolute_paths,
)
from hpctrain.launcher.contract.states import read_status

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class Point:
    name: str  # its run dir's name under the sweep dir
    values: dict[str, object]  # spec key -> value
    raw: dict[str, str]  # spec key -> the value as written after --over


def parse_over(texts: list[str]) -> list[tuple[str, list[tuple[str, object]]]]:
    """[(KEY, [(value as written, value)])] of `--over KEY=V1,V2,...`; values are numbers or YAML
    (true a boolean, [a, b] a list), their order kept."""
    out: list[tuple[str, list[tuple[str, object]]]] = []
    for text in texts:
        key, sep, rest = text.partition("=")
        key = key.strip()
        raws = [v.strip() for v in rest.split(",")] if sep else []
        if not key or not raws or any(not v for v in raws):
            raise UserError(f"bad --over '{text}'", field="--over", expected="KEY=V1,V2,... (values separated by commas)")
        if any(k == key for k, _ in out):
            raise UserError(f"--over names {key} twice", field="--over", expected="each key once")
        try:
            values = [(raw, _value(raw)) for raw in raws]
        except yaml.YAMLError:
            raise UserError(f"a value of --over {key} is not valid YAML", field="--over") from None
        if len({raw for raw, _ in values}) != len(values):
            raise UserError(f"--over {key} repeats a value", field="--over", expected="distinct values")
        out.append((key, values))
    if not out:
        raise UserError("no --over given", field="--over", expected="KEY=V1,V2,... (repeatable)")
    return out


def _value(raw: str) -> object:
    """A value as YAML reads it, numbers also in the forms YAML 1.1 leaves as text (3e-4)."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return yaml.safe_load(raw)


def _short(keys: list[str]) -> dict[str, str]:
    """Each key's last part where that names it alone among the sweep's keys, else the whole key."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def grid(over: list[tuple[str, list[tuple[str, object]]]]) -> list[Point]:
    """Every combination of the values, the first key's values outermost."""
    short = _short([k for k, _ in over])
    points = []
    for combo in itertools.product(*[vals for _, vals in over]):
        raw = {k: r for (k, _), (r, _) in zip(over, combo, strict=True)}
        name = ",".join(f"{short[k]}={re.sub(r'[^A-Za-z0-9._-]', '_', r)}" for k, r in raw.items())
        points.append(Point(name, {k: v for (k, _), (_, v) in zip(over, combo, strict=True)}, raw))
    return points


def sweep_specs(spec_file: str, overrides: list[str], over_texts: list[str]) -> tuple[RunSpec, list[tuple[Point, RunSpec]]]:
    """(the base spec, [(point, its spec)]); every point validated as a spec (errors of all
    points at once, each named by its point)."""
    from hpctrain.launcher.pipeline import is_pipeline

    data = load_spec_dict(spec_file)
    if is_pipeline(data):
        raise UserError("a pipeline cannot be swept", file=spec_file, expected="a single-run spec")
    base_data = apply_overrides(copy.deepcopy(data), overrides)
    base = with_absolute_paths(spec_from_dict(copy.deepcopy(base_data), spec_file))
    root = Path(base.run_path)
    out: list[tuple[Point, RunSpec]] = []
    errors: list[UserError] = []
    seen: set[tuple] = set()  # a mistake every point makes (a misspelt key) is said once
    for point in grid(parse_over(over_texts)):
        try:
            body = apply_overrides(copy.deepcopy(base_data), [f"{k}={r}" for k, r in point.raw.items()])
        except UserError as e:  # the path of an --over, not of a --set
            e.field = (e.field or "").replace("--set ", "--over ", 1)
            raise
        body["name"] = f"{base.name}-{point.name}"
        body["run_dir"] = str(root / point.name)
        wandb = body.setdefault("monitor", {}).setdefault("wandb", {})
        if isinstance(wandb, dict):  # the points of a sweep: one W&B project, one group
            wandb.setdefault("group", base.name)
            wandb.setdefault("project", base.monitor.wandb.project or base.name)
        try:
            out.append((point, with_absolute_paths(spec_from_dict(body, spec_file))))
        except UserError as e:
            for err in e.errors if isinstance(e, UserErrors) else [e]:
                if (err.message, err.field, err.expected, err.hint) in seen:
                    continue
                seen.add((err.message, err.field, err.expected, err.hint))
                err.field = f"point {point.name}: {err.field}" if err.field else f"point {point.name}"
                errors.append(err)
    if errors:
        raise UserErrors(errors)
    return base, out


def write_sweep_file(base: RunSpec, spec_file: str, points: list[tuple[Point, RunSpec]]) -> Path:
    """RUN_DIR/sweep.json, atomically (a sweep started again with other points replaces it)."""
    root = Path(base.run_path)
    root.mkdir(parents=True, exist_ok=True)
    record = {"name": base.name, "spec": str(Path(spec_file).resolve()),
              "keys": list(points[0][0].values) if points else [],
              "points": [{"name": p.name, "values": p.values, "run_dir": s.run_path} for p, s in points]}
    path = root / SWEEP_FILE
    tmp = path.with_name(f".{SWEEP_FILE}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_sweep(directory: str | Path) -> dict | None:
    f = Path(directory) / SWEEP_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        raise UserError("sweep.json does not parse", file=str(f)) from None


def point_dirs(directory: str | Path) -> list[Path] | None:
    """The run dirs of a sweep dir's points, or None when `directory` is no sweep."""
    sweep = read_sweep(directory)
    return None if sweep is None else [Path(p["run_dir"]) for p in sweep["points"]]


def point_summary(run_dir: Path) -> dict:
    """What the report shows of one point: state, step, tokens, and per validation set its
    best loss (with the step) and its last."""
    records = metrics_records(run_dir)
    by_step: dict[int, dict] = {}
    for r in records:
        if "step" in r and "mem_base_mib" not in r:
            by_step.setdefault(int(r["step"]), {}).update(r)  # a step logged again after a resume: the last wins
    sets: dict[str | None, dict] = {}
    for step in sorted(by_step):
        for name, loss in validation_losses(by_step[step]):
            s = sets.setdefault(name, {"best": loss, "best_step": step, "final": loss, "final_step": step})
            if loss < s["best"]:
                s["best"], s["best_step"] = loss, step
            s["final"], s["final_step"] = loss, step
    tokens = max((r.get("tokens_seen", 0) for r in by_step.values()), default=0)
    st = read_status(run_dir)
    return {"state": st.state or "not started", "step": st.step if st.state else None, "total": st.total_steps,
            "tokens": tokens, "sets": sets}


def report(directory: str | Path) -> str:
    """The sweep's table: a row per point, each validation set's best (step) and final loss,
    the tokens trained, then the point that is best on each set."""
    sweep = read_sweep(directory)
    if sweep is None:
        raise UserError("not a sweep dir (no sweep.json)", file=str(directory),
                        expected="the run dir of a spec run with hpctrain sweep")
    rows = [(p, point_summary(Path(p["run_dir"]))) for p in sweep["points"]]
    sets = sorted({n for _, s in rows for n in s["sets"]}, key=lambda n: (n is not None, n or ""))
    label = {n: (n or "val") for n in sets}
    head = ["point", "state", "step", "tokens"] + [x for n in sets for x in (f"{label[n]} best (step)", f"{label[n]} final")]
    table = []
    for p, s in rows:
        step = f"{s['step']}/{s['total']}" if s["step"] is not None and s["total"] else str(s["step"] or "-")
        cells = [p["name"], str(s["state"]), step, f"{s['tokens']:,}"]
        for n in sets:
            v = s["sets"].get(n)
            cells += [f"{v['best']:.4f} ({v['best_step']})", f"{v['final']:.4f}"] if v else ["-", "-"]
        table.append(cells)
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    keys = ", ".join(sweep.get("keys", []))
    lines = [f"sweep {directory}: {len(rows)} point(s) over {keys}",
             "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    for n in sets:
        scored = [(s["sets"][n]["best"], s["sets"][n]["best_step"], p["name"]) for p, s in rows if n in s["sets"]]
        if scored:
            loss, step, name = min(scored)
            lines.append(f"best on {label[n]}: {name} (loss {loss:.4f} at step {step})")
    if not sets:
        lines.append("no validation yet (data.validation, training.eval_every)")
    return "\n".join(lines)
