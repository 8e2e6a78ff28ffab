"""The pickle scan (no torch): what a file would call when loaded, read without loading it."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest

from hpctrain.launcher.contract.checkpoints import (
    CheckpointMeta,
    file_records,
    newest_whole_checkpoint,
)
from hpctrain.launcher.contract.pickles import (
    CHECKPOINT_GLOBALS,
    TENSOR_GLOBALS,
    pickle_globals,
    unsafe_global,
)
from hpctrain.launcher.contract.rundir import RunDir


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_plain_containers_pass_and_a_reduce_to_os_system_is_named(tmp_path):
    marker = tmp_path / "ran"
    ok = _write(tmp_path / "ok.pt", pickle.dumps({"step": 3, "lr": [0.1, 0.2], "name": "x"}))
    bad = _write(tmp_path / "bad.pt", pickle.dumps({"state": [1, Planted(marker)]}))
    assert unsafe_global(ok, TENSOR_GLOBALS) is None
    assert unsafe_global(bad, CHECKPOINT_GLOBALS) == (
        "would call posix.system when loaded (only tensors and plain containers are allowed)")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_every_protocol_names_the_global(tmp_path, protocol):
    f = _write(tmp_path / "p.pt", pickle.dumps([1, Planted(tmp_path / "m")], protocol=protocol))
    assert ("posix", "system") in pickle_globals(f)


def test_a_mark_cannot_hide_the_names_stack_global_takes(tmp_path):
    """'os' 'system' pushed, then harmless names inside a MARK that POP_MARK drops: STACK_GLOBAL
    takes os.system, and so does the scan (a look-back at the last two strings would not)."""
    ops = (b"\x80\x04" + b"\x8c\x02os" + b"\x8c\x06system" + b"(" + b"\x8c\x05torch" + b"\x8c\x07float32"
           + b"1" + b"\x93" + b"\x8c\x02id" + b"\x85R.")
    f = _write(tmp_path / "trick.pt", ops)
    assert pickle_globals(f) == [("os", "system")]
    assert "os.system" in unsafe_global(f, CHECKPOINT_GLOBALS)


def test_names_from_the_memo_are_followed(tmp_path):
    ops = (b"\x80\x04" + b"\x8c\x02os\x94" + b"\x8c\x06system\x94" + b"\x8c\x05torch\x94"
           + b"h\x00h\x01\x93" + b"\x8c\x02id\x85R.")  # BINGET 0, BINGET 1
    assert pickle_globals(_write(tmp_path / "memo.pt", ops)) == [("os", "system")]


def test_a_torch_zip_is_read_through_its_data_pkl(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Planted(tmp_path / "m")}))
        z.writestr("archive/version", "3\n")
    f = _write(tmp_path / "optim.pt", buf.getvalue())
    assert "posix.system" in unsafe_global(f, CHECKPOINT_GLOBALS)
    assert "not a readable pickle" in unsafe_global(_write(tmp_path / "cut.pt", buf.getvalue()[:40]),
                                                    CHECKPOINT_GLOBALS)


def _checkpoint(run, step: int, files: dict[str, bytes]):
    d = RunDir(run).checkpoints / f"step_{step:08d}"
    for rel, data in files.items():
        _write(d / rel, data)
    (d / "meta.json").write_text(CheckpointMeta(step=step, world_size=1, sampler={}, files=file_records(d)).to_json())
    return d


@pytest.mark.parametrize("planted", ["optim.pt", "rng_rank0.pt", "ds/mp_rank_00_model_states.pt", "dcp/.metadata"])
def test_a_checkpoint_with_a_planted_pickle_is_skipped_even_with_matching_checksums(tmp_path, planted):
    """Its sizes and checksums recorded to match (as whoever planted it would): the scan still
    names it, and the newest checkpoint without one is chosen."""
    safe = pickle.dumps({"w": [0.0] * 4})
    older = _checkpoint(tmp_path, 4, {"optim.pt": safe, "rng_rank0.pt": safe})
    newer = _checkpoint(tmp_path, 8, {"optim.pt": safe, "rng_rank0.pt": safe,
                                      planted: pickle.dumps(Planted(tmp_path / "m"))})
    path, skipped = newest_whole_checkpoint(tmp_path)
    assert path == older
    assert skipped == [(newer, f"{planted} would call posix.system when loaded "
                               "(only tensors and plain containers are allowed)")]
    # a pickle left beside the recorded files (e.g. a planted conversion folder) counts too
    _write(older / "ds_universal" / "zero" / "fp32.pt", pickle.dumps(Planted(tmp_path / "m")))
    assert newest_whole_checkpoint(tmp_path)[0] is None
