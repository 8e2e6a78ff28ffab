"""How a rank ends on a failure it can name: a full disk found through torch's wrapping, and a
peer's record honoured only when this attempt wrote it."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest
import torch

from hpctrain.trainers.exits import disk_full_cause, peer_recorded_failure


def test_a_full_disk_is_found_behind_torch_save(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        with pytest.raises(Exception) as e, open(mnt / "x.pt", "wb") as f:
            torch.save({"w": torch.zeros(1 << 20)}, f)  # 4 MiB into 256 KiB
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert not isinstance(e.value, OSError)  # torch wraps it (a RuntimeError here)
    assert disk_full_cause(e.value).errno == errno.ENOSPC
    assert disk_full_cause(RuntimeError("unrelated")) is None


def test_only_this_attempts_record_is_a_peers_reason(tmp_path):
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"state": "failed", "reason": "disk full: ...", "disk_full": True}))
    old = time.time() - 60
    os.utime(status, (old, old))  # the last attempt's record
    assert peer_recorded_failure(tmp_path, since=time.time() - 1) is None
    status.write_text(status.read_text())  # written again, by a peer of this attempt
    assert peer_recorded_failure(tmp_path, since=time.time() - 1) == "disk full: ..."
    status.write_text(json.dumps({"state": "failed", "reason": "rank 1 killed by SIGKILL"}))
    assert peer_recorded_failure(tmp_path, since=time.time() - 1) is None  # not a named ending


def test_a_rank_whose_disk_full_record_no_longer_fits_defers_to_its_peers(small_disk, monkeypatch):
    """Two ranks meet the full disk at once (the last save): the first one's record takes the
    space the reserve freed, the second one's does not fit. It exits 0 under torchrun when the
    peer's record of this attempt is there (torchrun prints no report over the console's one
    line), 1 when there is none to stand for it."""
    from hpctrain.trainers.exits import disk_full_exit
    from tests.conftest import fill_disk

    status = small_disk / "status.json"
    status.write_text(json.dumps({"state": "failed", "reason": "disk full: ...", "disk_full": True}))
    fill_disk(small_disk / "filler", leave=0)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    full = OSError(errno.ENOSPC, "No space left on device")
    assert disk_full_exit(full, small_disk, since=time.time() - 5) == 0  # the peer's record stands
    old = time.time() - 60
    os.utime(status, (old, old))  # the last attempt's record: nothing of this one is written
    assert disk_full_exit(full, small_disk, since=time.time() - 5) == 1
    assert json.loads(status.read_text())["reason"] == "disk full: ..."  # untouched, whole
