"""The order in which tools/test.sh hands modules to its workers (tests/scheduling.py)."""

from __future__ import annotations

from types import SimpleNamespace

from tests import scheduling


def test_modules_go_heaviest_first_with_the_slurm_modules_as_one_unit(monkeypatch):
    table = {"tests/a.py": 5.0, "tests/b.py": 100.0, "tests/slurm/test_x.py": 60.0, "tests/slurm/test_y.py": 50.0}
    monkeypatch.setattr(scheduling, "module_seconds", lambda: table)
    ids = ["tests/a.py::t1", "tests/slurm/test_x.py::t1", "tests/b.py::t2", "tests/b.py::t1",
           "tests/new.py::t1", "tests/slurm/test_y.py::t1", "tests/a.py::t0"]
    items = [SimpleNamespace(nodeid=i) for i in ids]
    scheduling.heaviest_first(items)
    assert [x.nodeid for x in items] == [
        "tests/slurm/test_x.py::t1", "tests/slurm/test_y.py::t1",  # 110 s together
        "tests/b.py::t2", "tests/b.py::t1",  # the order within a module is kept
        "tests/new.py::t1",  # not in the table: NEW_MODULE_S
        "tests/a.py::t1", "tests/a.py::t0",
    ]
    assert scheduling.scope_of("tests/slurm/test_y.py::t1") == scheduling.scope_of("tests/slurm/test_x.py::t")


def test_the_table_sums_each_modules_setup_call_and_teardown():
    log = ("12.50s call     tests/trainers/test_a.py::test_x[1]\n"
           "3.00s setup    tests/trainers/test_a.py::test_x[1]\n"
           "0.40s teardown tests/b.py::test_y\n"
           "(1 durations < 0.005s hidden.)\n")
    assert scheduling.table_from_log(log) == {"tests/trainers/test_a.py": 15.5, "tests/b.py": 0.4}
