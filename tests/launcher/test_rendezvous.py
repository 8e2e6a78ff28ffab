"""The rendezvous port of a Slurm attempt."""

from __future__ import annotations

from hpctrain.launcher.slurm import rendezvous_port


def test_a_requeued_attempt_rendezvous_on_another_port_than_the_one_before():
    ports = [rendezvous_port(73, r) for r in range(4)]
    assert len(set(ports)) == 4  # the previous attempt's store may still hold its port
    assert all(20000 <= p < 40000 for p in ports)
    assert rendezvous_port(73, 0) != rendezvous_port(74, 0)  # neighbouring jobs apart too
    assert rendezvous_port(12345, 2) == rendezvous_port(12345, 2)  # every node task agrees
