"""The reward of bench/bench_grpo.py, imported by both contenders: TRL's signature."""


def vowel_share(prompts, completions, **fields):  # noqa: ARG001
    """A cheap verifiable reward: the share of the completion's letters that are vowels."""
    out = []
    for c in completions:
        letters = [ch for ch in c.lower() if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / len(letters) if letters else 0.0)
    return out
