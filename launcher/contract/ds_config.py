"""The DeepSpeed config of a run: a template from ds_configs/ (or the user's JSON) with every
value the spec owns filled in from the spec. Pure: no torch, no deepspeed.

The spec is the one source of truth for batch sizes, accumulation, clipping and
precision; the optimizer and LR schedule are the trainer's own (fused AdamW and the
warmup + decay schedule, handed to DeepSpeed as client objects). A value set both in
the spec and in a user JSON with a different value is refused, naming both.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hpctrain.launcher.contract.errors import UserError, UserErrors
from hpctrain.launcher.contract.spec import RunSpec

TEMPLATES = Path(__file__).resolve().parents[2] / "ds_configs"
LIVE_LAYERS = 2  # ZeRO-3 keeps about this many transformer blocks gathered at once


def zero3_live_parameters(n_params: int, hidden: int, world: int, largest: int = 0) -> int:
    """How many parameter elements ZeRO-3 may hold gathered at once (DeepSpeed's
    `stage3_max_live_parameters` and `stage3_max_reuse_distance`, which the trainer fills for
    "auto"): LIVE_LAYERS blocks of a transformer (12·hidden² each: attention 4·h², an MLP of
    about 8·h²), or the largest single parameter (an embedding matrix, gathered whole anyway)
    where that is more; never more than a rank's share of the model, and never DeepSpeed's
    default of 1e9, the whole of most models. Shared by the trainer and `plan`."""
    share = max(n_params // max(world, 1), hidden * hidden)
    return int(min(1e9, share, max(LIVE_LAYERS * 12 * hidden * hidden, largest)))


def template_name(stage: int, offload_optimizer: str, offload_params: str) -> str:
    return "zero3_offload" if stage == 3 and "cpu" in (offload_optimizer, offload_params) else f"zero{stage}"


def _get(d: dict, dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    cur = d
    for part in parents:
        cur = cur.setdefault(part, {})
    cur[last] = value


def spec_owned_values(spec: RunSpec, accum: int) -> dict[str, tuple[Any, str]]:
    """DeepSpeed key -> (value, the spec field it comes from)."""
    t, e = spec.training, spec.engine
    out: dict[str, tuple[Any, str]] = {
        "train_batch_size": (t.global_batch, "training.global_batch"),
        "train_micro_batch_size_per_gpu": (t.micro_batch, "training.micro_batch"),
        "gradient_accumulation_steps": (accum, "training.global_batch / (micro_batch x ranks)"),
        "gradient_clipping": (t.grad_clip or 0.0, "training.grad_clip"),
        "bf16.enabled": (t.precision == "bf16", "training.precision"),
    }
    if e.zero_stage is not None:
        out["zero_optimization.stage"] = (e.zero_stage, "engine.zero_stage")
    # with a template the spec decides offload (default none); a user JSON keeps its own unless set
    if e.offload_optimizer is not None or e.config is None:
        out["zero_optimization.offload_optimizer.device"] = (e.offload_optimizer or "none",
                                                             "engine.offload_optimizer")
    if e.offload_params is not None or e.config is None:
        out["zero_optimization.offload_param.device"] = (e.offload_params or "none", "engine.offload_params")
    return out


def build_ds_config(spec: RunSpec, world_size: int, file: str | None = None) -> dict:
    """The complete DeepSpeed config for `world_size` ranks; raises UserErrors on conflicts."""
    e = spec.engine
    accum = spec.training.global_batch // (spec.training.micro_batch * world_size)
    problems: list[UserError] = []
    if e.config is not None:
        path = Path(e.config)
        try:
            base = json.loads(path.read_text())
        except OSError as err:
            raise UserError(f"cannot read it ({err.strerror})", file=file, field="engine.config",
                            expected="a DeepSpeed JSON file") from None
        except json.JSONDecodeError as err:
            raise UserError(f"not valid JSON: {err}", file=str(path), field="engine.config") from None
        if not isinstance(base, dict):
            raise UserError("not a JSON object", file=str(path), field="engine.config")
        for owned in ("optimizer", "scheduler"):
            if owned in base:
                problems.append(UserError(
                    f"'{owned}' is set in the DeepSpeed JSON", file=str(path), field="engine.config",
                    expected=f"no '{owned}': the spec owns it (training.lr, betas, weight_decay, schedule, "
                    "warmup_steps)"))
        source = str(path)
    else:
        stage = e.zero_stage or 2
        name = template_name(stage, e.offload_optimizer or "none", e.offload_params or "none")
        base = json.loads((TEMPLATES / f"{name}.json").read_text())
        source = f"ds_configs/{name}.json"
    cfg = copy.deepcopy(base)
    for key, (value, field) in spec_owned_values(spec, accum).items():
        have = _get(cfg, key)
        if have is not None and have != "auto" and have != value and e.config is not None:
            problems.append(UserError(
                f"{key} is {have!r} in {source} but {value!r} from the spec ({field})",
                file=file, field="engine.config", expected="one value: remove it from the JSON or make them equal"))
            continue
        _set(cfg, key, value)
    zo = cfg.setdefault("zero_optimization", {})
    zo.setdefault("stage", 2)
    for k in ("offload_optimizer", "offload_param"):
        if isinstance(zo.get(k), dict) and zo[k].get("device") in (None, "none"):
            zo.pop(k)
    if zo.get("offload_param") and zo["stage"] != 3:
        problems.append(UserError("parameter offload needs ZeRO stage 3", file=file,
                                  field="engine.offload_params", expected="zero_stage: 3"))
    if problems:
        raise UserErrors(problems)
    return cfg


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage a complete config (`build_ds_config`) runs: the spec's, or the JSON's."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def zero_choice(spec: RunSpec) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer offloaded, parameters offloaded) that the spec's DeepSpeed section
    runs: its engine fields where set, else what its JSON (engine.config) says, else the
    template's. Raises the UserErrors `build_ds_config` does."""
    cfg = build_ds_config(spec, max(spec.cluster.world_size, 1))
    zo = cfg["zero_optimization"]  # build_ds_config drops an offload section whose device is none
    return zero_stage(cfg), "offload_optimizer" in zo, "offload_param" in zo
