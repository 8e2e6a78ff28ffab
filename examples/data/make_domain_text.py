"""Regenerate examples/data/domain.txt: small domain text written for hpctrain (CC0).

The sentences are composed from templates in this file (all text original to
the hpctrain project, released to the public domain under CC0), so the shipped
corpus can be redistributed and regenerated:  python examples/data/make_domain_text.py
"""

import random
from pathlib import Path

SUBJECTS = [
    "the scheduler",
    "a batch job",
    "the compute node",
    "the login node",
    "the parallel file system",
    "the training run",
    "the checkpoint",
    "the interconnect",
    "the job array",
    "the node health check",
    "the queue",
    "a preempted job",
    "the requeued job",
    "the data loader",
    "the optimizer state",
]
VERBS = [
    "waits for",
    "allocates",
    "writes",
    "reads",
    "signals",
    "restarts from",
    "reserves",
    "drains",
    "reports",
    "releases",
    "streams",
    "shards",
    "checks",
    "copies",
    "records",
]
OBJECTS = [
    "two nodes with four accelerators each",
    "the newest complete checkpoint",
    "a wall-time limit of two hours",
    "the token corpus in memory-mapped shards",
    "a signal ninety seconds before the deadline",
    "the gradient of every rank",
    "the exact next sample after the restart",
    "a fair share of the partition",
    "the metrics of each step",
    "the memory of the host",
    "a reservation for the weekend",
    "the learning rate schedule",
    "a blend of new domain text and general replay data",
]
CLAUSES = [
    "so that no work is lost",
    "before the time limit runs out",
    "while the other ranks wait at the barrier",
    "because the cluster is busy tonight",
    "after the administrator drains the rack",
    "when the accounting database is unavailable",
    "unless the quota of the project is exhausted",
    "so the loss curve continues where it stopped",
    "and the job keeps the same identifier",
]


def compose(seed: int, subjects, verbs, objects, clauses, documents: int = 600) -> list[str]:
    """Documents of 1-3 sentences, each subject verb object clause, drawn with `seed`."""
    rng = random.Random(seed)
    lines = []
    for _ in range(documents):
        n = rng.randint(1, 3)
        sents = []
        for _ in range(n):
            s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(clauses)}."
            sents.append(s[0].upper() + s[1:])
        lines.append(" ".join(sents))
    return lines


def write(name: str, lines: list[str]) -> None:
    out = Path(__file__).with_name(name)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} documents to {out}")


def main() -> None:
    write("domain.txt", compose(7, SUBJECTS, VERBS, OBJECTS, CLAUSES))


if __name__ == "__main__":
    main()
