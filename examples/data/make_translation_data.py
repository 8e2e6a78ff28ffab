"""Regenerate the small English -> German parallel corpus in examples/data (text written for
hpctrain, CC0): the seq2seq example and tests re-train a translation model on it.

    python examples/data/make_translation_data.py

Sentences about a cluster, "the scheduler starts the new job today.", and their German, built
from a phrase table with German's own grammar: articles and adjective endings by gender and
case, and verb-second order when a time phrase leads ("Heute startet der Scheduler den neuen
Job."). Small enough for a tiny model to learn in minutes on a CPU, rich enough that BLEU
rises step by step instead of jumping.

- translate_base.jsonl: `source`/`target` pairs without time phrases, the corpus a "pretrained"
  model learned (the example's first stage);
- translate_train.jsonl / translate_valid.jsonl: the new data to re-train on: every sentence
  has a time phrase, often first, so the verb-second order is what re-training teaches;
- translate_valid.tsv: the validation pairs again, as two tab-separated columns.
"""

import json
import random
from pathlib import Path

# (English, German nominative) subjects
SUBJECTS = [("the scheduler", "der Scheduler"), ("the file system", "das Dateisystem"),
            ("the admin", "die Administratorin"), ("every rank", "jeder Rang"),
            ("the login node", "der Login-Knoten"), ("the network", "das Netzwerk"),
            ("the user", "die Nutzerin"), ("the trainer", "der Trainer")]
# (English, German 3rd person singular)
VERBS = [("starts", "startet"), ("stops", "stoppt"), ("checks", "prüft"), ("writes", "schreibt"),
         ("reads", "liest"), ("copies", "kopiert"), ("saves", "speichert"), ("moves", "verschiebt"),
         ("deletes", "löscht"), ("needs", "braucht")]
# (English noun, German noun, gender: m f n pl)
OBJECTS = [("job", "Job", "m"), ("checkpoint", "Checkpoint", "m"), ("model", "Modell", "n"),
           ("data", "Daten", "pl"), ("log file", "Logdatei", "f"), ("queue", "Warteschlange", "f"),
           ("shard", "Shard", "m"), ("report", "Bericht", "m"), ("token", "Token", "n"),
           ("partition", "Partition", "f")]
ADJECTIVES = [("new", "neu"), ("old", "alt"), ("large", "groß"), ("small", "klein"), ("last", "letzt")]
TIMES = [("today", "heute"), ("at night", "nachts"), ("again", "erneut"), ("every hour", "jede Stunde"),
         ("after the update", "nach dem Update"), ("before the run", "vor dem Lauf")]

ACCUSATIVE = {"m": "den", "f": "die", "n": "das", "pl": "die"}
# the weak adjective ending after a definite article, accusative
ENDING = {"m": "en", "f": "e", "n": "e", "pl": "en"}


def pair(rng: random.Random, with_time: bool) -> tuple[str, str]:
    subj_en, subj_de = rng.choice(SUBJECTS)
    verb_en, verb_de = rng.choice(VERBS)
    noun_en, noun_de, gender = rng.choice(OBJECTS)
    obj_en, obj_de = f"the {noun_en}", f"{ACCUSATIVE[gender]} {noun_de}"
    if rng.random() < 0.6:
        adj_en, adj_de = rng.choice(ADJECTIVES)
        obj_en, obj_de = f"the {adj_en} {noun_en}", f"{ACCUSATIVE[gender]} {adj_de}{ENDING[gender]} {noun_de}"
    if not with_time:
        return f"{subj_en} {verb_en} {obj_en}.", f"{subj_de} {verb_de} {obj_de}."
    time_en, time_de = rng.choice(TIMES)
    if rng.random() < 0.5:  # the time phrase leads: the verb stays second, the subject follows it
        return f"{time_en}, {subj_en} {verb_en} {obj_en}.", f"{time_de} {verb_de} {subj_de} {obj_de}."
    return f"{subj_en} {verb_en} {obj_en} {time_en}.", f"{subj_de} {verb_de} {obj_de} {time_de}."


def capital(s: str) -> str:
    return s[0].upper() + s[1:]


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(23)
    sets = {"translate_base.jsonl": (600, False), "translate_train.jsonl": (600, True),
            "translate_valid.jsonl": (60, True)}
    written = {}
    for name, (n, with_time) in sets.items():
        rows = [tuple(capital(x) for x in pair(rng, with_time)) for _ in range(n)]
        written[name] = rows
        with open(here / name, "w", encoding="utf-8") as f:
            for src, tgt in rows:
                f.write(json.dumps({"source": src, "target": tgt}, ensure_ascii=False) + "\n")
    with open(here / "translate_valid.tsv", "w", encoding="utf-8") as f:
        for src, tgt in written["translate_valid.jsonl"]:
            f.write(f"{src}\t{tgt}\n")
    print("wrote", ", ".join([*sets, "translate_valid.tsv"]))


if __name__ == "__main__":
    main()
