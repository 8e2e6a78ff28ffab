"""Regenerate examples/data/general.txt: small general text written for hpctrain (CC0).

The "general" side of the ratio-sweep example (examples/ratio_sweep.yaml): everyday sentences
composed from templates in this file (all text original to the hpctrain project, released to
the public domain under CC0), unlike the cluster vocabulary of domain.txt, so that training on
more domain text shows on its validation loss. Regenerate: python examples/data/make_general_text.py
"""

import random
from pathlib import Path

SUBJECTS = [
    "my neighbour",
    "the baker on the corner",
    "a small child",
    "the old dog",
    "our teacher",
    "the river",
    "a tired traveller",
    "the morning train",
    "the garden",
    "my grandmother",
    "the street market",
    "a flock of birds",
    "the library",
    "the fishing boat",
    "the summer storm",
]
VERBS = [
    "brings",
    "remembers",
    "paints",
    "finds",
    "carries",
    "waits for",
    "follows",
    "sells",
    "hears",
    "loves",
]
OBJECTS = [
    "fresh bread and warm soup",
    "a letter from an old friend",
    "the smell of rain on the road",
    "three red apples",
    "the sound of the bells",
    "a map of the mountains",
    "the first snow of the winter",
    "a basket of blue flowers",
    "the song from the radio",
    "a bicycle with a broken chain",
    "the evening light over the hills",
]
CLAUSES = [
    "before breakfast",
    "on the way to the harbour",
    "when the shops close",
    "while the kettle boils",
    "because the holiday starts tomorrow",
    "after the long walk home",
    "as the sun goes down",
    "every Sunday in spring",
]


def main() -> None:
    rng = random.Random(11)
    lines = []
    for _ in range(600):
        sents = []
        for _ in range(rng.randint(1, 3)):
            s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(CLAUSES)}."
            sents.append(s[0].upper() + s[1:])
        lines.append(" ".join(sents))
    out = Path(__file__).with_name("general.txt")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} documents to {out}")


if __name__ == "__main__":
    main()
