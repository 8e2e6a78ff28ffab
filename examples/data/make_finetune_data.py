"""Regenerate the small fine-tuning sets in examples/data (text written for hpctrain, CC0).

    python examples/data/make_finetune_data.py

- classify_{train,valid}.csv: `text,label` sentences about a cluster, labelled by
  topic (scheduling | storage | network): a small, separable classification task.
- sft_{train,valid}.jsonl: `prompt`/`response` pairs (questions and short answers).
- pairs_{train,valid}.jsonl: preference pairs `prompt`/`chosen`/`rejected`: the same questions,
  the right answer chosen over another topic's.
"""

import csv
import json
import random
from pathlib import Path

TOPICS = {
    "scheduling": (["the scheduler", "the queue", "a batch job", "the job array", "the reservation"],
                   ["waits for free nodes", "raises the priority of", "requeues", "allocates two nodes to",
                    "holds back", "starts after the dependency of"]),
    "storage": (["the parallel file system", "the checkpoint", "the scratch space", "the quota", "the object store"],
                ["fills up with", "writes the shards of", "syncs the metadata of", "stripes the files of",
                 "keeps a snapshot of", "deletes old copies of"]),
    "network": (["the interconnect", "the switch", "the all-reduce", "the fabric manager", "the network link"],
                ["routes the traffic of", "drops packets from", "doubles the bandwidth of",
                 "adds latency to", "balances the load of", "reconnects"]),
}
OBJECTS = ["the training run", "every rank", "the large model", "the night shift", "the data loader",
           "the evaluation job", "the project", "the old partition"]


def sentence(rng, topic):
    subj, verbs = TOPICS[topic]
    s = f"{rng.choice(subj)} {rng.choice(verbs)} {rng.choice(OBJECTS)}."
    return s[0].upper() + s[1:]


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(11)
    for name, n in (("classify_train.csv", 240), ("classify_valid.csv", 60)):
        with open(here / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for _ in range(n):
                topic = rng.choice(sorted(TOPICS))
                w.writerow([sentence(rng, topic), topic])
    answers = {"scheduling": "The scheduler decides.", "storage": "The file system keeps it.",
               "network": "The interconnect carries it."}
    for name, n in (("sft_train.jsonl", 160), ("sft_valid.jsonl", 40)):
        with open(here / name, "w") as f:
            for _ in range(n):
                topic = rng.choice(sorted(TOPICS))
                prompt = f"Who is responsible here? {sentence(rng, topic)}"
                f.write(json.dumps({"prompt": prompt, "response": answers[topic]}) + "\n")
    for name, n in (("pairs_train.jsonl", 160), ("pairs_valid.jsonl", 40)):
        with open(here / name, "w") as f:
            for _ in range(n):
                topic = rng.choice(sorted(TOPICS))
                wrong = answers[rng.choice(sorted(set(TOPICS) - {topic}))]
                prompt = f"Who is responsible here? {sentence(rng, topic)}"
                f.write(json.dumps({"prompt": prompt, "chosen": answers[topic], "rejected": wrong}) + "\n")
    print("wrote", ", ".join(sorted(p.name for p in here.glob("*.csv")) + sorted(p.name for p in here.glob("*.jsonl"))))


if __name__ == "__main__":
    main()
