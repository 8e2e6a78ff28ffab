"""Reading W&B's offline run files, and merging the segments of one run.

A `.wandb` file is a LevelDB-style log: a 7-byte header (`:W&B`, 0xBEE1, version 0),
then 32 KiB blocks of records (crc32 4 bytes, length 2, type 1: full, first, middle,
last), each record's payload a protobuf `Record` (wandb.proto.wandb_internal_pb2). We
parse the framing ourselves (wandb's own reader has been removed upstream; checked
against wandb 0.31) and tolerate a torn tail (a crash mid-write).

Released wandb starts a new offline folder `RUN_DIR/wandb/offline-run-<time>-<id>` for
every attempt, even with `resume="allow"`. `merged_history` makes one history of them:
segments in time order, and for each step the values of the newest segment that logged
it (after a crash, the segment that continued from the checkpoint).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = b":W&B"


def records(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != HEADER:
        raise ValueError(f"{path}: not a W&B run file")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length:
            return  # torn tail
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def read_run(path: Path) -> dict:
    """{id, project, group, config, history: {step: {key: value}}, rows} of one `.wandb` file
    (`rows`: history records read; more than steps means a step was written twice)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"id": None, "project": None, "group": None, "config": {}, "history": {}, "rows": 0}
    for raw in records(path):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - a torn record at the end of a crashed segment
            break
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, project=rec.run.project, group=rec.run.run_group)
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            out["rows"] += 1
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    row[key] = json.loads(item.value_json)
            out["history"].setdefault(rec.history.step.num, {}).update(row)
    return out


def offline_segments(run_dir: Path) -> list[Path]:
    """The run's offline segments (their `.wandb` files), oldest first."""
    root = Path(run_dir) / "wandb"
    return sorted(root.glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def merged_history(run_dir: Path) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for seg in offline_segments(run_dir):
        for step, row in read_run(seg)["history"].items():
            # the newer segment wins each value (it continued from the checkpoint); a value only
            # the older one logged at that step (a background save that ended there) stays, as
            # in metrics.jsonl read as the last value per step and key
            merged.setdefault(step, {}).update(row)
    return dict(sorted(merged.items()))


SYNCED_FILE = "wandb_synced.json"
MERGED_DIR = "wandb-merged"


def _init(spec, run_id: str, mode: str, directory: Path):
    import os

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    w = spec.monitor.wandb
    return wandb.init(
        project=w.project or spec.name, entity=w.entity, group=w.group, tags=w.tags or None,
        name=spec.name, id=run_id, resume="allow", mode=mode, dir=str(directory),
        config=spec.model_dump(mode="json"),
        settings=wandb.Settings(console="off", save_code=False, silent=True),
    )


def sync(run_dir: Path, offline: bool = False, log=print) -> int:
    """`hpctrain sync RUN_DIR`: the run's offline segments as one W&B run.

    Upload (default): continue the run's id online, send each merged step the server does
    not have yet (above its `starting_step` and above what an earlier sync sent, recorded
    in RUN_DIR/wandb_synced.json), so a second sync sends nothing.
    `offline=True`: write the merged run as one offline run under RUN_DIR/wandb-merged/
    (replaced as a whole on every call), which a plain `wandb sync PATH` uploads as one run.
    Returns the number of steps written.
    """
    from hpctrain.launcher.contract.errors import UserError
    from hpctrain.launcher.contract.rundir import WANDB_ID_FILE, RunDir, atomic_write_text
    from hpctrain.launcher.contract.spec import load_spec_dict, spec_from_dict

    run_dir = Path(run_dir)
    frozen = RunDir(run_dir).spec_file
    if not frozen.is_file():
        raise UserError("not a run directory (no spec.yaml)", file=str(run_dir))
    if not (run_dir / WANDB_ID_FILE).is_file():
        raise UserError("W&B was never enabled for this run (no wandb_id)", file=str(run_dir),
                        field="monitor.wandb.mode", expected="offline or online")
    segments = offline_segments(run_dir)
    if not segments:
        raise UserError("no offline W&B segments to sync (online runs upload as they go)",
                        file=str(run_dir / "wandb"))
    spec = spec_from_dict(load_spec_dict(frozen), str(frozen))
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    history = merged_history(run_dir)
    log(f"{len(segments)} offline segment(s) of W&B run {run_id}: {len(history)} steps after merging "
        f"(steps {min(history, default=0)}-{max(history, default=0)}; a re-trained step keeps the newer value)")
    if offline:
        import shutil
        import tempfile

        final = run_dir / MERGED_DIR
        tmp = Path(tempfile.mkdtemp(prefix=".wandb-merged-", dir=run_dir))
        run = _init(spec, run_id, "offline", tmp)
        for step, row in history.items():
            run.log(row, step=step)
        run.finish()
        shutil.rmtree(final, ignore_errors=True)
        (tmp / "wandb").rename(final)
        shutil.rmtree(tmp, ignore_errors=True)
        folder = next(final.glob("offline-run-*"))
        log(f"merged offline run: {folder}  (upload it as one run: wandb sync {folder})")
        return len(history)
    ledger = run_dir / SYNCED_FILE
    sent = json.loads(ledger.read_text())["last_step"] if ledger.is_file() else 0
    todo = {s: r for s, r in history.items() if s > sent}
    if not todo:
        log(f"nothing to sync: W&B has every step up to {sent}")
        return 0
    run = _init(spec, run_id, "online", run_dir / ".wandb-sync")
    have = int(getattr(run, "starting_step", 0) or 0)
    todo = {s: r for s, r in todo.items() if s >= have}
    for step, row in todo.items():
        run.log(row, step=step)
    run.finish()
    atomic_write_text(ledger, json.dumps({"id": run_id, "last_step": max(history)}) + "\n")
    log(f"synced {len(todo)} step(s) to W&B run {run.url}")
    return len(todo)
