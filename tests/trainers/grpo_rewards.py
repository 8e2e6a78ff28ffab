"""Reward functions of the GRPO tests, in TRL's signature (imported by the ranks as
`tests.trainers.grpo_rewards:NAME`, the repository being where the runs start)."""


def mentions_scheduler(prompts, completions, **fields):  # noqa: ARG001
    """The toy verifiable reward: 1 when the completion names the scheduler."""
    return [1.0 if "scheduler" in c.lower() else 0.0 for c in completions]


def shorter(prompts, completions, **fields):  # noqa: ARG001
    """A reward that seldom ties within a group: the fewer characters the better. A tied group
    teaches nothing, so a short run whose groups all tie (no completion names the scheduler
    yet) would leave the policy where it started."""
    return [-len(c) / 100 for c in completions]


def matches_response(prompts, completions, response, **fields):  # noqa: ARG001
    """An extra field of the record (`response`) reaches the function, one per completion."""
    return [1.0 if c.strip() == r.strip() else 0.0 for c, r in zip(completions, response, strict=True)]


def constant(prompts, completions, **fields):  # noqa: ARG001
    return [1.0] * len(completions)


def raises(prompts, completions, **fields):  # noqa: ARG001
    raise ValueError("no scorer configured")


def not_a_number(prompts, completions, **fields):  # noqa: ARG001
    return [None] * len(completions)
