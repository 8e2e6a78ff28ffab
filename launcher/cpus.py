"""CPUs of a Slurm node task: torchrun and every rank of its node (pure functions of the spec).

Slurm gives a task one CPU unless told otherwise, and on clusters that bind tasks to their CPUs
(task/affinity, task/cgroup: most of them) every rank of the node would then share that core.
The node task asks for what its ranks need; each rank then pins itself to its own slice
(trainers/distributed.py: bind_rank_cpus).
"""

from __future__ import annotations

from hpctrain.launcher.contract.spec import RunSpec


def rank_cpus_needed(spec: RunSpec) -> int:
    """CPUs one rank keeps busy: itself and its data-loader workers."""
    return 1 + (spec.data.num_workers if spec.data is not None else 0)


def node_task_cpus(spec: RunSpec) -> int | None:
    """CPUs of each node task - torchrun and every rank of the node (pure): None for the whole
    node (exclusive jobs), else cluster.cpus_per_task or procs_per_node x cpus_per_rank."""
    c = spec.cluster
    if c.cpus_per_task is not None:
        return c.cpus_per_task
    if c.exclusive:
        return None
    return c.procs_per_node * (c.cpus_per_rank or rank_cpus_needed(spec))


def cpu_notes(spec: RunSpec) -> list[str]:
    """validate's line on the node task's CPUs, and a warning when the ranks need more."""
    c, cpus = spec.cluster, node_task_cpus(spec)
    per = "the whole node (exclusive: true)" if cpus is None else f"{cpus}"
    notes = [f"CPUs per node task: {per}, split evenly among its {c.procs_per_node} rank(s)"]
    need = c.procs_per_node * rank_cpus_needed(spec)
    if cpus is not None and cpus < need:
        notes.append(f"warning: {c.procs_per_node} rank(s) x (1 + data.num_workers) need {need} CPUs, "
                     f"the node task gets {cpus}: ranks share cores (raise cluster.cpus_per_task)")
    return notes


def cpus_line(spec: RunSpec) -> str:
    """What the job script gives srun as the node task's CPUs (a number, or the node's count)."""
    cpus = node_task_cpus(spec)
    return '"$SLURM_CPUS_ON_NODE"' if cpus is None else str(cpus)
