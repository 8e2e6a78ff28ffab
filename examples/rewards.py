"""Reward functions for `examples/pipeline_tiny_llama_rlhf.yaml`'s GRPO stage, in TRL's
signature: fn(prompts, completions, **fields) -> a float per completion. Every field of a
prompt's record other than the prompt arrives as a keyword argument, one value per completion
(here `response`, the answer the SFT file holds). The run imports them as
`examples.rewards:NAME`, from the directory it starts in (the repository)."""


def answers_first(prompts, completions, response, **fields):  # noqa: ARG001
    """1.0 when the completion opens with the record's answer (what follows it is not judged)."""
    return [1.0 if text.strip().startswith(answer.strip()) else 0.0
            for text, answer in zip(completions, response, strict=True)]
