"""The checkpoint layout, its meta record, and discovery of the newest whole checkpoint. No torch.

    RUN_DIR/checkpoints/.step_N.tmp/   being written (ignored by every reader)
    RUN_DIR/checkpoints/step_N/        complete: it holds meta.json, written last before the rename
      model.pt optim.pt                engine state (rank 0 for DDP; DeepSpeed writes its own files)
      rng_rank{R}.pt                   every rank's RNG states
      meta.json                        `CheckpointMeta`: step, tokens seen, sampler state, world
                                       size, time, and each file's size and crc32
    RUN_DIR/checkpoints/latest         "step_N" of the newest complete checkpoint (a derived view,
                                       written last; readers scan instead of trusting it)
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from hpctrain.launcher.contract.pickles import CHECKPOINT_GLOBALS, pickled_files, unsafe_global

CHECKPOINTS = "checkpoints"
META = "meta.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    """The folder name of the checkpoint of `step` (zero-padded: names sort as steps do)."""
    return f"step_{step:08d}"


def unfinished_name(step: int) -> str:
    """The folder a save of `step` writes into before it is complete."""
    return f".{step_name(step)}.tmp"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


@dataclass
class CheckpointMeta:
    """meta.json of a checkpoint. `task` holds what one trainer alone keeps (fine-tuning's best
    metric and patience); on disk every field is a top-level key, as it always was."""

    step: int
    world_size: int
    sampler: dict
    tokens_seen: int = 0
    spec_name: str = ""
    saved_at: float = 0.0
    files: dict[str, list[int]] = field(default_factory=dict)
    task: dict = field(default_factory=dict)
    rank_state: dict | None = field(default=None, repr=False)  # this rank's, from its RNG file (not meta.json)

    KNOWN = ("step", "world_size", "sampler", "tokens_seen", "spec_name", "saved_at", "files")

    def to_json(self) -> str:
        known = {k: getattr(self, k) for k in self.KNOWN}
        return json.dumps({**self.task, **known}, indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> CheckpointMeta:
        return cls(**{k: data[k] for k in cls.KNOWN if k in data},
                   task={k: v for k, v in data.items() if k not in cls.KNOWN})

    @classmethod
    def read(cls, checkpoint: Path) -> CheckpointMeta:
        return cls.from_dict(json.loads((Path(checkpoint) / META).read_text()))


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first. Incomplete ones are invisible."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / META).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def file_records(directory: Path) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of every file under a checkpoint folder but its meta.json:
    what a resume checks before it trusts the checkpoint (a copy cut short, a failing disk)."""
    out = {}
    for f in sorted(Path(directory).rglob("*")):
        if f.is_file() and f.name != META:
            out[f.relative_to(directory).as_posix()] = [f.stat().st_size, file_crc32(f)]
    return out


def file_crc32(path: Path, chunk: int = 4 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def checkpoint_damage(path: Path, checksums: bool = True) -> str | None:
    """Why a complete checkpoint cannot be trusted, or None when every file is as it was saved
    (sizes always; contents with `checksums`) and no pickled file in it could run code when
    loaded (with `checksums`: DeepSpeed and the distributed checkpoint unpickle some files
    without torch's weights_only guard; contract/pickles.py). A checkpoint saved before files
    were recorded is checked for the pickles alone."""
    try:
        recorded = json.loads((path / META).read_text()).get("files")
    except (OSError, ValueError) as e:
        return f"{META} does not read ({e})"
    for rel, (size, crc) in (recorded or {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        on_disk = f.stat().st_size
        if on_disk != size:
            return f"{rel} has {on_disk:,} bytes on disk, {size:,} when it was saved"
        if checksums and file_crc32(f) != crc:
            return f"{rel} differs from what was saved (checksum)"
    if checksums:  # every pickle, recorded or not (a conversion left beside the shards too)
        for f in pickled_files(path):
            why = unsafe_global(f, CHECKPOINT_GLOBALS)
            if why is not None:
                return f"{f.relative_to(path).as_posix()} {why}"
    return None


def newest_whole_checkpoint(run_dir: str | Path, checksums: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint a resume takes, found by scanning (never trusting a stored path): the newest
    complete one whose files are whole, and the newer ones skipped (with why). Without
    `checksums` only sizes are compared (what `status` and the launcher's messages afford)."""
    skipped = []
    for _, path in reversed(complete_checkpoints(run_dir)):
        why = checkpoint_damage(path, checksums)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


