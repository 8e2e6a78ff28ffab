"""`hpctrain plot RUN_DIR [RUN_DIR ...] [--out FILE.png]`: one figure to compare runs.

Panels against the training step: training loss (line) with validation loss (dots), LR,
tokens/s, and MFU (or achieved TFLOP/s per device where no MFU is known, as on CPU); a run
with named validation sets (`data.validation` as a list) gets a panel per set; an RL run (GRPO)
gets its mean reward (dots: validation's) and its KL to the reference.
Restarts (an attempt resuming from a checkpoint) are dashed vertical lines in the run's
colour. Read from each run's metrics.jsonl (the last value of each step wins).
"""

from __future__ import annotations

from pathlib import Path

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.rundir import RunDir, metrics_records


def series(run_dir: Path) -> dict:
    """{step-keyed columns, restarts} from metrics.jsonl."""
    f = RunDir(run_dir).metrics
    if not f.is_file():
        raise UserError("no metrics.jsonl (has the run started?)", file=str(run_dir))
    rows: dict[int, dict] = {}
    starts: list[int] = []
    for rec in metrics_records(run_dir):
        if "mem_base_mib" in rec:
            starts.append(int(rec["step"]))
            continue
        rows.setdefault(int(rec.get("step", 0)), {}).update(rec)
    steps = sorted(rows)

    def col(key: str) -> tuple[list[int], list[float]]:
        xs = [s for s in steps if rows[s].get(key) is not None]
        return xs, [float(rows[s][key]) for s in xs]

    named = sorted({k[len("val/"):-len("/loss")] for r in rows.values() for k in r
                    if k.startswith("val/") and k.endswith("/loss")})
    return {"loss": col("loss"), "val_loss": col("val_loss"), "lr": col("lr"), "tokens_per_s": col("tokens_per_s"),
            "mfu": col("mfu"), "tflops": col("tflops_per_device"), "restarts": [s for s in starts if s > 0],
            "val_sets": {name: col(f"val/{name}/loss") for name in named},
            "reward": col("reward"), "eval_reward": col("eval_reward"), "kl": col("kl")}


def plot(run_dirs: list[str], out: str | None) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib is not installed", field="hpctrain plot",
                        expected="the extra: bash tools/setup.sh examples,plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpctrain.launcher.sweep import point_dirs

    runs = []
    for r in run_dirs:
        points = point_dirs(r)  # a sweep dir: every point that has started
        if points is None:
            runs.append((Path(r), series(Path(r))))
        else:
            runs += [(d, series(d)) for d in points if RunDir(d).metrics.is_file()]
    if not runs:
        raise UserError("no point of the sweep has started", file=run_dirs[0])
    use_mfu = any(s["mfu"][0] for _, s in runs)
    sets = sorted({name for _, s in runs for name in s["val_sets"]})  # named validation sets: a panel each
    rl = any(s["reward"][0] for _, s in runs)  # GRPO: a row for the reward and the KL
    top = 3 if rl else 2
    rows = top + (len(sets) + 1) // 2
    fig, grid = plt.subplots(rows, 2, figsize=(12, 3.75 * rows), sharex=True, squeeze=False)
    (ax_loss, ax_lr), (ax_tok, ax_eff) = grid[0], grid[1]
    val_axes = dict(zip(sets, grid[top:].flat, strict=False))
    for ax in list(grid[top:].flat)[len(sets):]:
        ax.set_visible(False)
    axes = grid[:top]
    for i, (path, s) in enumerate(runs):
        color = f"C{i}"
        name = path.name if path.name not in ("run", "") else f"{path.parent.name}/{path.name}"
        ax_loss.plot(*s["loss"], color=color, lw=1.2, label=f"{name} train")
        if s["val_loss"][0]:
            ax_loss.plot(*s["val_loss"], "o", color=color, ms=4, label=f"{name} validation")
        for set_name, points in s["val_sets"].items():
            val_axes[set_name].plot(*points, "o-", color=color, ms=4, lw=1, label=name)
        ax_lr.plot(*s["lr"], color=color, lw=1.2, label=name)
        if rl:
            grid[2][0].plot(*s["reward"], color=color, lw=1.2, label=f"{name} train")
            if s["eval_reward"][0]:
                grid[2][0].plot(*s["eval_reward"], "o", color=color, ms=4, label=f"{name} validation")
            grid[2][1].plot(*s["kl"], color=color, lw=1.2, label=name)
        ax_tok.plot(*s["tokens_per_s"], color=color, lw=1.2, label=name)
        if use_mfu:
            xs, ys = s["mfu"]
            ax_eff.plot(xs, [100 * y for y in ys], color=color, lw=1.2, label=name)
        else:
            ax_eff.plot(*s["tflops"], color=color, lw=1.2, label=name)
        for step in s["restarts"]:
            for ax in [*axes.flat, *val_axes.values()]:
                ax.axvline(step, color=color, ls="--", lw=0.8, alpha=0.7)
    ax_loss.set_title("loss (dots: validation)")
    ax_lr.set_title("learning rate")
    ax_tok.set_title("tokens/s")
    ax_eff.set_title("MFU (%)" if use_mfu else "achieved TFLOP/s per device (no MFU on CPU)")
    if rl:
        grid[2][0].set_title("reward (dots: validation)")
        grid[2][0].legend(fontsize=8)
        grid[2][1].set_title("KL to the reference")
    for set_name, ax in val_axes.items():
        ax.set_title(f"validation loss: {set_name}")
        ax.legend(fontsize=8)
    for ax in [*axes.flat, *val_axes.values()]:
        ax.grid(alpha=0.3)
    for ax in grid[-1]:
        ax.set_xlabel("step")
    ax_loss.legend(fontsize=8)
    if any(s["restarts"] for _, s in runs):
        fig.text(0.01, 0.005, "dashed lines: restarts (resumed from a checkpoint)", fontsize=8)
    fig.suptitle(", ".join(run_dirs) if len(runs) > 1 else str(runs[0][0]), fontsize=10)
    fig.tight_layout()
    target = Path(out) if out else Path(run_dirs[0]) / "plot.png"
    tmp = target.with_name(f".{target.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(target)
    return target
