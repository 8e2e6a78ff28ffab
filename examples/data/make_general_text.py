"""Regenerate examples/data/general.txt: small general text written for hpctrain (CC0).

The "general" side of the ratio-sweep example (examples/ratio_sweep.yaml): everyday sentences
composed from templates in this file (all text original to the hpctrain project, released to
the public domain under CC0), unlike the cluster vocabulary of domain.txt, so that training on
more domain text shows on its validation loss. Regenerate: python examples/data/make_general_text.py
"""

from make_domain_text import compose, write  # the same composer, other words

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
    write("general.txt", compose(11, SUBJECTS, VERBS, OBJECTS, CLAUSES))


if __name__ == "__main__":
    main()
