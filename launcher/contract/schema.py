"""What every section of the run spec is built from: the strict pydantic base, the tags of a
field that takes one form or a list, and the metric keys of validation sets."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A spec section: unknown keys are errors, values frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# tags of a field that takes one form or a list of another: errors name the list's own path
ONE, MANY = "(one)", "(list)"
UNION_TAGS = (ONE, MANY)


TRAINING_NAMES = frozenset({"reward", "reward_std", "kl"})
"""Plain metric names that training steps log too (GRPO's, TRL's names): validation's copy of
one is `eval_<name>`, as TRL's is."""


def metric_key(name: str | None, what: str) -> str:
    """The metrics key of `what` (loss, ppl, accuracy, f1, rewards/margins) of a validation set:
    `val_loss`, `val_ppl`, `accuracy`, `f1`, `eval_rewards/margins` for the single unnamed set
    (as always; TRL's eval_ prefix where the name is TRL's), `val/<name>/<what>` for a named one
    (pretraining's corpora and fine-tuning's files alike)."""
    if name is None:
        if "/" in what or what in TRAINING_NAMES:  # a TRL name (rewards/chosen, reward): a training
            return f"eval_{what}"                  # step logs it too; validation's is eval_<name>
        return {"loss": "val_loss", "ppl": "val_ppl"}.get(what, what)
    return f"val/{name}/{what}"


def named_once(names: list[str], field: str, what: str) -> None:
    """A list of named sets names each once (`field`.i is where each sits)."""
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ValueError(f"two {what} are named {n!r} ({field}.{names.index(n)} and {field}.{i}): "
                             "names must differ")
