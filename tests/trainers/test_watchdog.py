"""The hang limit without `monitor.hang_timeout_s`: 10x the median of the last 50 step times,
never under the floor (and twice the floor before the first step)."""

from hpctrain.trainers.watchdog import FLOOR_S, Watchdog


def test_limit_follows_the_last_fifty_steps(tmp_path):
    dog = Watchdog(tmp_path, rank=0, world_size=1, limit_s=None, total=1000)
    try:
        assert dog.limit() == 2 * FLOOR_S  # start-up: no step yet
        for step in range(1, 201):
            dog.beat(step, 100.0)  # slow steps
        assert dog.limit() == 1000.0
        for step in range(201, 251):
            dog.beat(step, 40.0)  # the last 50 steps are faster: the limit follows them
        assert dog.limit() == 400.0
        for step in range(251, 301):
            dog.beat(step, 0.5)  # fast steps: the floor holds
        assert dog.limit() == FLOOR_S
        assert len(dog.times) == 50  # a long run keeps only what the limit reads
    finally:
        dog.stop()
