"""How `tools/test.sh` spreads the test modules over its two pytest-xdist workers.

`--dist loadfile` hands a worker a whole module at a time (its module fixtures, the reference
runs, then run once), in pytest-xdist's order: the modules with the most tests first. Test count
says little about cost here (a module of one test can start four 2-rank runs), and a heavy
module picked up last keeps one worker busy while the other has nothing left. So the modules
go out heaviest first, by their seconds in a recent run of the suite (`module_seconds.json`;
a module not in it counts as `NEW_MODULE_S`), and the light ones fill the end.

The Slurm modules are one unit, on one worker in turn: they share the three-node cluster (a
fixture in `tests/slurm/conftest.py` makes them take turns, which a worker holding the second
of them would spend waiting). Much of their time is waiting on Slurm; started first, it overlaps
the CPU-bound modules of the other worker.

Refresh the table from a run with `--durations=0`:

    bash tools/test.sh --durations=0 | tee /tmp/suite.log
    .venv/bin/python -m tests.scheduling /tmp/suite.log
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

TABLE = Path(__file__).with_name("module_seconds.json")
NEW_MODULE_S = 30.0
SLURM = "tests/slurm/"


def scope_of(nodeid: str) -> str:
    """The unit a worker takes whole: a module, or all the Slurm modules together."""
    module = nodeid.split("::", 1)[0]
    return SLURM if module.startswith(SLURM) else module


def module_seconds() -> dict[str, float]:
    try:
        return json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return {}


def heaviest_first(items: list) -> None:
    """Reorder collected items in place: units by their seconds, heaviest first; the order
    within a module is kept (a stable sort)."""
    seconds = module_seconds()
    cost: dict[str, float] = {}
    for module in dict.fromkeys(item.nodeid.split("::", 1)[0] for item in items):
        scope = scope_of(module)
        cost[scope] = cost.get(scope, 0.0) + seconds.get(module, NEW_MODULE_S)
    items.sort(key=lambda item: -cost[scope_of(item.nodeid)])


def make_scheduler(config, log):
    """A loadfile scheduler whose units are `scope_of` and whose order is the collection's (as
    `heaviest_first` left it), not pytest-xdist's count of tests."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduler(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    config.option.loadscopereorder = False
    return Scheduler(config, log)


def table_from_log(text: str) -> dict[str, float]:
    """Seconds per module from pytest's `--durations=0` lines (setup, call and teardown)."""
    out: dict[str, float] = {}
    for m in re.finditer(r"^([0-9.]+)s (?:setup|call|teardown)\s+(\S+?)::", text, re.M):
        out[m.group(2)] = round(out.get(m.group(2), 0.0) + float(m.group(1)), 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.scheduling PYTEST_LOG (a run with --durations=0)", file=sys.stderr)
        return 2
    table = table_from_log(Path(argv[0]).read_text())
    if not table:
        print(f"{argv[0]}: no --durations lines", file=sys.stderr)
        return 2
    TABLE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{TABLE}: {len(table)} modules, {sum(table.values()):.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
