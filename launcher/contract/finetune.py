"""The `finetune` section of the run spec: one typed class per kind (a union told apart by
`kind`), and what each method trains.

A kind declares here, without torch, what is known before a job is queued: the fields its
examples need, the metrics it reports and which way each is better, the transformers class its
model is built with, and the checks `validate` runs on its files. What it does in a training
process (its batches, loss, evaluation, export) is its task module, `trainers/tasks/<kind>.py`.
Adding a kind is one class here, one line in `KINDS`, and its task module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.schema import MANY, ONE, Strict, metric_key, named_once


@dataclass(frozen=True)
class Method:
    """What a fine-tuning method trains, declared once: nothing else compares method names."""

    name: str
    adapter: bool
    """Trains adapters on a frozen base: checkpoints hold only the trained tensors, the export is
    the adapter, and `merge` folds it into the base."""
    quantized: bool = False
    """The frozen base is loaded in 4 bits (bitsandbytes NF4)."""
    peft_config: str = "LoraConfig"
    """The peft config class of an adapter method (`FinetuneBase.adapter_config`)."""
    partial: bool = False
    """Trains the parameters `finetune.freeze` names in place, the rest frozen: checkpoints and
    the export hold the whole model."""
    virtual_tokens: bool = False
    """Trains virtual tokens fed to every layer as a past key-value cache (prefix tuning): nothing
    to fold into the weights (no merge), and a model input that already holds a cache of its own
    (GRPO's sampler, SFT's generation metrics) or masks of its own (packed documents) cannot
    take it."""


KIND_HELP = ("sft: prompt -> response; classify: text -> label; reward: preference pairs -> a scalar score; "
             "dpo: preference pairs -> a policy that prefers the chosen response; grpo: prompts -> a policy that "
             "samples completions and learns toward higher reward (a reward model and/or reward functions); "
             "seq2seq: source -> target with an encoder-decoder model (translation, summarisation), scored by "
             "generating: BLEU, chrF, ROUGE-L")

ENCODER_DECODER_TYPES = {"marian", "t5", "mt5", "umt5", "bart", "mbart", "pegasus", "pegasus_x", "m2m_100", "fsmt",
                         "led", "longt5", "mvp", "plbart", "prophetnet", "blenderbot", "blenderbot-small",
                         "bigbird_pegasus", "switch_transformers", "nllb-moe"}
"""model_type values of encoder-decoder models (a config.json without is_encoder_decoder)."""


def is_encoder_decoder(config: dict) -> bool:
    """Whether a model config (config.json, or model.config) is an encoder-decoder."""
    return bool(config.get("is_encoder_decoder", config.get("model_type") in ENCODER_DECODER_TYPES))

METHODS = {m.name: m for m in (Method("full", adapter=False), Method("lora", adapter=True),
                               Method("qlora", adapter=True, quantized=True),
                               Method("ia3", adapter=True, peft_config="IA3Config"),
                               Method("prefix", adapter=True, peft_config="PrefixTuningConfig", virtual_tokens=True),
                               Method("freeze", adapter=False, partial=True))}


class LoraSpec(Strict):
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA path")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names to adapt (default: peft's per-architecture choice; 'all-linear')"
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved with the adapter (the classifier head is added)"
    )
    use_dora: bool = Field(False, description="DoRA: each adapted weight split into a magnitude (trained) and a "
                           "direction (LoRA updates it); closer to full fine-tuning at low rank, slower steps")
    use_rslora: bool = Field(False, description="rsLoRA: scale alpha / sqrt(r) instead of alpha / r (higher "
                             "ranks keep learning)")


class Ia3Spec(Strict):
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="modules whose activations (or inputs) IA3 rescales (default: peft's per-architecture "
        "choice, e.g. k_proj, v_proj, down_proj for Llama)")
    feedforward_modules: list[str] | None = Field(
        None, description="of target_modules, those whose input is rescaled (the feed-forward ones); default: "
        "peft's choice")


class PrefixSpec(Strict):
    num_virtual_tokens: int = Field(20, ge=1, le=1024, description="virtual tokens prepended at every layer")
    prefix_projection: bool = Field(False, description="learn the prefix through a two-layer MLP (more "
                                    "parameters, often steadier training) instead of directly")
    encoder_hidden_size: int | None = Field(None, ge=1, description="the projection MLP's hidden size (default: "
                                            "the model's hidden size)")


class FreezeSpec(Strict):
    """What `method: freeze` trains (everything else is frozen): the top or bottom blocks and/or
    the parameters whose names match (LLaMA-Factory's freeze_trainable_layers, Axolotl's
    unfrozen_parameters)."""

    trainable_layers: int | None = Field(None, description="the top N transformer blocks (negative: the "
                                         "bottom N)")
    trainable_modules: list[str] | None = Field(None, description="regexes searched in parameter names "
                                                "(e.g. 'embed_tokens', 'norm', 'lm_head'); each must match one")

    @model_validator(mode="after")
    def _something(self) -> FreezeSpec:
        import re

        if self.trainable_layers == 0:
            raise ValueError("finetune.freeze.trainable_layers is 0: give the top N blocks (N > 0) or the bottom "
                             "N (N < 0), or leave it out")
        for i, rx in enumerate(self.trainable_modules or []):
            try:
                re.compile(rx)
            except re.error as e:
                raise ValueError(f"finetune.freeze.trainable_modules.{i}: {rx!r} is not a regular expression "
                                 f"({e})") from None
        return self


class NamedValidFile(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="the set's name in metrics (val/<name>/loss, /accuracy, /f1)")
    path: str = Field(description="JSONL (sft, classify) or CSV (classify) validation examples")


class FinetuneBase(Strict):
    """What every fine-tuning kind has: its files, method, lengths and the choice of the best."""

    MODEL_CLASS: ClassVar[str]
    """The transformers Auto class the model is built with."""
    METRICS: ClassVar[dict[str, bool]]
    """What each validation set reports ("loss", "accuracy"...) and whether higher is better."""
    DEFAULT_BEST: ClassVar[str]
    """The metric that picks the best export unless `best_metric` says otherwise."""
    ROWS_PER_EXAMPLE: ClassVar[int] = 1
    """Sequences an example puts through the model in a micro-batch (`plan` counts them)."""

    kind: str = Field(description=KIND_HELP)
    method: Literal["full", "lora", "qlora", "ia3", "prefix", "freeze"] = Field(
        "lora", description="what is trained: full | lora | qlora | ia3 | prefix (adapters) | freeze (the parts "
        "`freeze` names)")
    lora: LoraSpec = LoraSpec()
    ia3: Ia3Spec = Ia3Spec()
    prefix: PrefixSpec = PrefixSpec()
    freeze: FreezeSpec | None = Field(None, description="method freeze: the blocks and parameters trained")
    train_file: str = Field(description="JSONL (sft, classify) or CSV (classify) training examples")
    valid_file: Annotated[
        Annotated[str, Tag(ONE)] | Annotated[list[NamedValidFile], Tag(MANY)],
        Discriminator(lambda v: MANY if isinstance(v, list) else ONE),
    ] | None = Field(None, description="validation examples (default: a seeded split of train_file), or a "
                     "list of named files {name, path}, each evaluated and logged as val/<name>/...")
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="share of train_file held out when no valid_file")
    seq_len: int = Field(128, gt=1, description="tokens per example (longer ones are truncated and counted)")
    group_by_length: bool = Field(
        True, description="batch examples of similar length together (less padding; seeded, exact on resume)"
    )
    best_metric: str | None = Field(None, description="val_loss | accuracy | f1, or val/<name>/loss | accuracy | f1 "
                                    "with named valid files (default: the (first) set's loss; accuracy to classify)")
    early_stopping_patience: int | None = Field(None, ge=1, description="evaluations without improvement before stopping")
    merge: bool = Field(False, description="lora/qlora/ia3: also export the merged full model")

    TAKES_VIRTUAL_TOKENS: ClassVar[bool] = False
    """Whether the kind's model inputs can take prefix tuning's virtual tokens (tested there)."""

    @property
    def trains(self) -> Method:
        """The method's declaration (`METHODS`)."""
        return METHODS[self.method]

    def adapter_config(self) -> tuple[str, dict, str]:
        """An adapter method's peft config: (its class in peft, its arguments, the spec field that
        names its target modules). `modules_to_save` lists the spec's own; the trainer adds the
        new task head."""
        if self.trains.peft_config == "PrefixTuningConfig":
            p = self.prefix
            return ("PrefixTuningConfig", {"num_virtual_tokens": p.num_virtual_tokens,
                                           "prefix_projection": p.prefix_projection,
                                           "encoder_hidden_size": p.encoder_hidden_size, "modules_to_save": None},
                    "finetune.prefix")
        if self.trains.peft_config == "IA3Config":
            return ("IA3Config", {"target_modules": self.ia3.target_modules,
                                  "feedforward_modules": self.ia3.feedforward_modules, "modules_to_save": None},
                    "finetune.ia3.target_modules")
        lo = self.lora
        return ("LoraConfig", {"r": lo.r, "lora_alpha": lo.alpha, "lora_dropout": lo.dropout,
                               "target_modules": lo.target_modules, "use_dora": lo.use_dora,
                               "use_rslora": lo.use_rslora, "modules_to_save": lo.modules_to_save},
                "finetune.lora.target_modules")

    def valid_sets(self) -> list[tuple[str | None, str, str]]:
        """[(name, or None for the single unnamed file; path; spec field)] of the validation files."""
        v = self.valid_file
        if v is None:
            return []
        if isinstance(v, str):
            return [(None, v, "finetune.valid_file")]
        return [(x.name, x.path, f"finetune.valid_file.{i}.path") for i, x in enumerate(v)]

    def metrics_for_best(self) -> list[str]:
        """What `best_metric` may name for this run."""
        names = [n for n, _, _ in self.valid_sets()] or [None]
        return [metric_key(n, k) for n in names for k in self.metric_directions()]

    def best(self) -> str:
        """The metric that picks the best export: `best_metric`, or the first set's default."""
        sets = self.valid_sets()
        return self.best_metric or metric_key(sets[0][0] if sets else None, self.default_best())

    def higher_is_better(self, metric: str) -> bool:
        """The direction the kind declares for `metric` (a key of `metrics_for_best`)."""
        names = [n for n, _, _ in self.valid_sets()] or [None]
        return next(better for n in names for what, better in self.metric_directions().items()
                    if metric_key(n, what) == metric)

    def rows(self) -> int:
        """Sequences an example puts through the model in a micro-batch (`plan` counts them)."""
        return self.ROWS_PER_EXAMPLE

    def row_tokens(self) -> int:
        """The longest sequence the model sees (`plan` counts activations of this length)."""
        return self.seq_len

    def frozen_copy(self) -> bool:
        """Whether the run holds a frozen copy of the model beside it (`plan` counts it)."""
        return False

    def generates(self) -> bool:
        """Whether training samples completions (`plan` counts their KV cache)."""
        return False

    def updates_per_batch(self) -> int:
        """Optimizer steps each global batch of examples serves (GRPO's num_iterations)."""
        return 1

    def other_models(self) -> list[tuple[str, str]]:
        """[(spec field, path)] of the models the run loads besides `model` (GRPO's reward model):
        `validate` checks each, and a pipeline resolves `stage:NAME` in them."""
        return []

    def other_model_problem(self, field: str, config: dict) -> str | None:  # noqa: ARG002
        """What makes the model of `field` (its config.json) unfit, or None."""
        return None

    def import_problems(self) -> list[tuple[str, str]]:
        """[(spec field, what is wrong)] of the user code the run imports (reward functions)."""
        return []

    def reference_kind(self) -> str | None:
        """Where a preference kind's reference log-probs come from (None: no reference)."""
        return None

    def model_problem(self, config: dict) -> str | None:  # noqa: ARG002 - most kinds take any head
        """What makes the model of `model.path` (its config.json) unfit for this kind, or None."""
        return None

    def architecture_problem(self, config: dict) -> str | None:
        """An encoder-decoder model for a kind of decoder-only or encoder models, or the reverse
        (config.json or model.config), or None."""
        kind_wants = self.MODEL_CLASS == "AutoModelForSeq2SeqLM"
        if is_encoder_decoder(config) == kind_wants:
            return None
        what = ", ".join(config.get("architectures") or [str(config.get("model_type", "model"))])
        if kind_wants:
            return (f"kind {self.kind} needs an encoder-decoder model (Marian, T5, BART, mBART...); {what} is not "
                    "one (config.json is_encoder_decoder)")
        return (f"{what} is an encoder-decoder model: kind {self.kind} trains decoder-only or encoder models; "
                "use kind: seq2seq")

    def metric_directions(self) -> dict[str, bool]:
        """What each validation set reports and whether higher is better (the kind's METRICS)."""
        return self.METRICS

    def default_best(self) -> str:
        return self.DEFAULT_BEST

    def truncation_note(self) -> str:
        """How long examples were cut, for the count of truncated ones."""
        return f"truncated to {self.seq_len} tokens"

    def tsv_columns(self) -> list[str] | None:
        """The fields of a TSV file's columns (no header), or None where the kind reads none."""
        return None

    def head_labels(self) -> list[str] | None:
        """The outputs of the head the model gets, as `plan` counts them before any file is
        read (None: the model's own head)."""
        return None

    def record_fields(self, record: dict) -> list[str]:
        """The fields this example must have (validate and the trainer read them)."""
        raise NotImplementedError

    def csv_columns(self) -> list[str] | None:
        """The columns a CSV file of examples needs, or None where the kind reads JSONL only."""
        return None

    def record_problem(self, record: dict) -> str | None:  # noqa: ARG002 - most kinds have none
        """What is wrong with one example beyond a missing field (validate and the trainer ask)."""
        return None

    def epoch_known_from_files(self) -> bool:
        """Whether an epoch's examples are counted from the files (not after tokenizing)."""
        return True

    def check_examples(self, train: list[dict], valid: dict[str, list[dict] | None],
                       errors: list[UserError]) -> list[str]:
        """The kind's own checks of its read examples (`valid`: spec field -> examples);
        problems go to `errors`, notes for `validate` are returned."""
        return []

    @model_validator(mode="after")
    def _freeze_fits_method(self) -> FinetuneBase:
        named = self.freeze is not None and (self.freeze.trainable_layers or self.freeze.trainable_modules)
        if self.trains.partial and not named:
            raise ValueError("method freeze trains what finetune.freeze names: give freeze.trainable_layers "
                             "and/or freeze.trainable_modules")
        if self.freeze is not None and not self.trains.partial:
            raise ValueError(f"finetune.freeze is for method freeze (this spec's method is {self.method})")
        return self

    @model_validator(mode="after")
    def _virtual_tokens_fit(self) -> FinetuneBase:
        if not self.trains.virtual_tokens:
            return self
        if not self.TAKES_VIRTUAL_TOKENS:
            raise ValueError(f"method {self.method} (prefix tuning) is not offered for kind {self.kind}: its virtual "
                             "tokens enter as a key-value cache that this kind's model inputs do not take here; "
                             "kind sft takes them (or use lora or ia3)")
        if self.merge:
            raise ValueError(f"finetune.merge: method {self.method} has nothing to fold into the weights (its "
                             "virtual tokens are inputs, not weight updates); the adapter export is what loads")
        return self

    @model_validator(mode="after")
    def _valid_files(self) -> FinetuneBase:
        if isinstance(self.valid_file, list):
            if not self.valid_file:
                raise ValueError("finetune.valid_file is an empty list: give at least one {name, path} or leave it out")
            named_once([x.name for x in self.valid_file], "finetune.valid_file", "validation files")
        if self.best_metric is not None and self.best_metric not in self.metrics_for_best():
            raise ValueError(f"finetune.best_metric {self.best_metric!r} is not a metric of this run (one of "
                             f"{', '.join(self.metrics_for_best())})")
        return self


GENERATION_METRICS = {"bleu": True, "chrf": True, "rougeL": True}
"""What generated text is scored with (higher is better for each)."""
TextMetric = Literal["bleu", "chrf", "rougeL"]


class GenerationSpec(Strict):
    """How evaluation generates (HF generate)."""

    num_beams: int | None = Field(None, ge=1, description="beam search width (default: the model's generation "
                                  "config, 1 for a model from model.config)")
    max_new_tokens: int | None = Field(None, ge=1, description="tokens generated at most (default: seq2seq's "
                                       "target_len; sft's 64)")


class ScoresGenerations(Strict):
    """What the kinds that score generated text at evaluation share (seq2seq; sft when asked):
    listed before FinetuneBase in a kind's bases, so its metric directions are these."""

    bleu_tokenize: Literal["13a", "intl", "zh", "char", "none"] = Field(
        "13a", description="sacrebleu's tokenizer for BLEU (those that need nothing more installed): 13a (its "
        "default), intl, zh (Chinese targets), char, none")
    generation: GenerationSpec = GenerationSpec()
    predictions_logged: int = Field(8, ge=0, description="outputs written beside their inputs and references at "
                                    "each evaluation to predictions/step_N.jsonl and the W&B table")

    def scored(self) -> list[str]:
        """The metrics generated text is scored with ([]: nothing is generated)."""
        raise NotImplementedError

    def metric_directions(self) -> dict[str, bool]:
        return {"loss": False, **{m: GENERATION_METRICS[m] for m in self.scored()}}


class SftSpec(ScoresGenerations, FinetuneBase):
    """Supervised fine-tuning: prompt -> response (or chat messages), loss on the response."""

    MODEL_CLASS: ClassVar[str] = "AutoModelForCausalLM"
    METRICS: ClassVar[dict[str, bool]] = {"loss": False}
    DEFAULT_BEST: ClassVar[str] = "loss"
    TAKES_VIRTUAL_TOKENS: ClassVar[bool] = True

    kind: Literal["sft"] = Field(description=KIND_HELP)
    prompt_field: str = Field("prompt", description="prompt field")
    response_field: str = Field("response", description="response field")
    messages_field: str = Field("messages", description="chat messages field (used when present)")
    packing: bool = Field(False, description="pack short examples into seq_len sequences")
    generation_metrics: list[TextMetric] = Field(
        [], description="at each evaluation, generate a response to every validation prompt and score it "
        "against the example's response: bleu, chrf, rougeL (off by default: a forward per generated token)")

    def scored(self) -> list[str]:
        return list(self.generation_metrics)

    def max_new_tokens(self) -> int:
        return self.generation.max_new_tokens or 64

    def record_fields(self, record: dict) -> list[str]:
        return [self.messages_field] if self.messages_field in record else [self.prompt_field, self.response_field]

    def csv_columns(self) -> list[str]:
        return [self.prompt_field, self.response_field]

    def epoch_known_from_files(self) -> bool:
        return not self.packing  # packed sequences are counted after tokenizing, at start

    @model_validator(mode="after")
    def _virtual_tokens_alone(self) -> SftSpec:
        if self.trains.virtual_tokens and (self.packing or self.generation_metrics):
            what = "finetune.packing" if self.packing else "finetune.generation_metrics"
            raise ValueError(f"{what} with method {self.method}: packed documents carry attention masks of their "
                             "own and generation a key-value cache of its own, which the virtual tokens (a cache) "
                             "would have to enter; turn it off or use lora or ia3")
        return self


class ClassifySpec(FinetuneBase):
    """Sequence classification: text -> one of `labels`, reporting accuracy and macro-F1."""

    MODEL_CLASS: ClassVar[str] = "AutoModelForSequenceClassification"
    METRICS: ClassVar[dict[str, bool]] = {"loss": False, "accuracy": True, "f1": True}
    DEFAULT_BEST: ClassVar[str] = "accuracy"

    kind: Literal["classify"] = Field(description=KIND_HELP)
    text_field: str = Field("text", description="text field / column")
    label_field: str = Field("label", description="label field / column")
    labels: list[str] | None = Field(None, description="label names in id order (default: sorted from train)")

    def head_labels(self) -> list[str]:
        return list(self.labels) if self.labels else ["0", "1"]  # the head is tiny either way

    def record_fields(self, record: dict) -> list[str]:  # noqa: ARG002 - the same for every record
        return [self.text_field, self.label_field]

    def csv_columns(self) -> list[str]:
        return [self.text_field, self.label_field]

    def check_examples(self, train: list[dict], valid: dict[str, list[dict] | None],
                       errors: list[UserError]) -> list[str]:
        """At least two labels, those of `labels` when given; no label in a validation file that
        training never shows."""
        labels = sorted({str(r[self.label_field]) for r in train})
        if self.labels is not None:
            unknown = sorted(set(labels) - set(self.labels))
            if unknown:
                errors.append(UserError(f"labels {unknown} are not in finetune.labels", field="finetune.labels",
                                        file=self.train_file, expected=f"one of {list(self.labels)}"))
            labels = list(self.labels)
        if len(labels) < 2:
            errors.append(UserError(f"only {len(labels)} label ({labels}) in the training examples",
                                    file=self.train_file, field="finetune.label_field",
                                    expected="at least two labels to classify"))
        notes = [f"  {len(labels)} labels: {', '.join(labels[:12])}{' ...' if len(labels) > 12 else ''}"]
        for _, raw, field in self.valid_sets():
            examples = valid.get(field)
            extra = sorted({str(r[self.label_field]) for r in examples} - set(labels)) if examples is not None else []
            if extra:
                errors.append(UserError(f"labels {extra} do not occur in the training file", file=raw,
                                        field=field, expected=f"labels of the training file ({', '.join(labels)})"))
        return notes


class PairsBase(FinetuneBase):
    """Kinds that learn from preference pairs: a prompt with a chosen and a rejected response,
    as strings or in chat form (a list of messages; each response a list of one assistant
    message)."""

    ROWS_PER_EXAMPLE: ClassVar[int] = 2  # chosen and rejected, in one forward

    prompt_field: str = Field("prompt", description="the prompt: a string, or chat messages")
    chosen_field: str = Field("chosen", description="the preferred response: a string, or a list holding "
                              "one assistant message")
    rejected_field: str = Field("rejected", description="the other response, in the same form")

    def record_problem(self, record: dict) -> str | None:
        for field in (self.chosen_field, self.rejected_field):
            value = record.get(field)
            if isinstance(value, str) and not value.strip() or value == []:
                return f"'{field}' is an empty response (refused)"
        if record.get(self.chosen_field) == record.get(self.rejected_field):
            return "chosen and rejected are the same response: the pair prefers nothing (refused)"
        return None

    def record_fields(self, record: dict) -> list[str]:  # noqa: ARG002 - the same for every record
        return [self.prompt_field, self.chosen_field, self.rejected_field]

    def csv_columns(self) -> list[str]:
        return [self.prompt_field, self.chosen_field, self.rejected_field]


class RewardSpec(PairsBase):
    """A reward model from preference pairs: a one-output head scores prompt + response, trained
    so that the chosen response scores above the rejected one (Bradley-Terry)."""

    MODEL_CLASS: ClassVar[str] = "AutoModelForSequenceClassification"
    METRICS: ClassVar[dict[str, bool]] = {"loss": False, "accuracy": True, "margin": True}
    DEFAULT_BEST: ClassVar[str] = "accuracy"

    kind: Literal["reward"] = Field(description=KIND_HELP)
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="weight of a term pulling rewards toward zero mean (TRL's name): "
        "coefficient x mean((r_chosen + r_rejected)^2)")

    def head_labels(self) -> list[str]:
        return ["reward"]

    def model_problem(self, config: dict) -> str | None:
        """A sequence classifier whose head has more than one output cannot score."""
        if not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
            return None  # no head yet: it gets one with one output
        outputs = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
        if outputs == 1:
            return None
        return (f"the model's classification head has {outputs} outputs (config.json id2label); a reward model's "
                "head has one")


class DpoSpec(PairsBase):
    """Direct preference optimisation: a causal LM (the policy) learns to prefer the chosen
    response over the rejected one, measured against a reference (the model it started from)."""

    MODEL_CLASS: ClassVar[str] = "AutoModelForCausalLM"
    # TRL's names, so dashboards built for TRL read ours (validation: eval_<name>, val/<set>/<name>)
    METRICS: ClassVar[dict[str, bool]] = {
        "loss": False, "rewards/accuracies": True, "rewards/margins": True, "rewards/chosen": True,
        "rewards/rejected": False, "logps/chosen": True, "logps/rejected": False}
    DEFAULT_BEST: ClassVar[str] = "loss"

    kind: Literal["dpo"] = Field(description=KIND_HELP)
    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference (DPO's beta)")
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's -log sigmoid(beta x margin); ipo: (margin - 1/(2 beta))^2 on "
        "per-token mean log-probs (TRL's names)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid loss: the assumed share of pairs "
                                   "whose preference is flipped (conservative DPO)")
    reference: Literal["adapter", "precompute", "model"] | None = Field(
        None, description="the reference log-probs: adapter (lora/qlora: the policy with its adapters off, the "
        "default there), precompute (full: one pass of the initial model before step 1, stored in the run dir; "
        "the default there), model (full: a frozen copy held as the engine holds the policy)")
    reference_chunk_pairs: int = Field(512, ge=1, description="precompute: pairs per stored part of the "
                                       "reference pass (a stop during the pass redoes at most one part)")
    disable_dropout: bool = Field(True, description="turn the policy's dropout off (as TRL does): the policy "
                                  "and the reference then score a pair alike at step 0")

    def frozen_copy(self) -> bool:
        return self.reference_kind() == "model"

    def reference_kind(self) -> str:
        """How the reference log-probs are had: `reference`, or the method's default."""
        return self.reference or ("adapter" if self.trains.adapter else "precompute")

    @model_validator(mode="after")
    def _reference_fits_method(self) -> DpoSpec:
        ref = self.reference_kind()
        if ref == "adapter" and not self.trains.adapter:
            raise ValueError("finetune.reference: adapter needs method lora or qlora (full fine-tuning has no "
                             "adapters to turn off): use precompute or model")
        if ref == "model" and self.trains.adapter:
            why = ("the base is loaded in 4 bits and frozen already" if self.trains.quantized
                   else "the base is frozen already")
            raise ValueError(f"finetune.reference: model with method {self.method}: {why}; the reference is "
                             "the policy with its adapters off (reference: adapter, the default)")
        return self


def sequence_classifier_problem(config: dict) -> str | None:
    """What keeps a model (its config.json) from scoring as a reward model: a head with one
    output on a sequence classifier is what a reward stage exports."""
    if not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return (f"the model is a {', '.join(config.get('architectures') or ['model without architectures'])}, not a "
                "sequence classifier with one output (config.json architectures)")
    outputs = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    if outputs != 1:
        return f"the model's classification head has {outputs} outputs (config.json id2label); a reward model's has one"
    return None


class GrpoSpec(FinetuneBase):
    """Group relative policy optimisation: a causal LM (the policy) samples `group_size`
    completions per prompt, a reward model and/or reward functions score them, and each
    completion's advantage (its reward against its group's) weighs a clipped surrogate loss,
    with a KL penalty keeping the policy near the reference (the model it started from)."""

    MODEL_CLASS: ClassVar[str] = "AutoModelForCausalLM"
    # TRL's names (validation: eval_<name>, val/<set>/<name>)
    METRICS: ClassVar[dict[str, bool]] = {"loss": False, "reward": True, "kl": False}
    DEFAULT_BEST: ClassVar[str] = "reward"

    kind: Literal["grpo"] = Field(description=KIND_HELP)
    prompt_field: str = Field("prompt", description="the prompt: a string, or chat messages (the record's other "
                              "fields reach the reward functions as keyword arguments)")
    seq_len: int = Field(128, gt=1, description="grpo: the prompt's tokens (a longer prompt keeps its end, counted)")
    group_size: int = Field(8, ge=2, description="completions sampled per prompt (TRL's num_generations); "
                            "global_batch and micro_batch count prompts")
    max_new_tokens: int = Field(64, ge=1, description="tokens of a completion at most (TRL's "
                                "max_completion_length); one that reaches it is counted as clipped")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (log-probs use it too, as TRL's)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set of tokens holding this "
                         "share of the probability")
    epsilon: float = Field(0.2, gt=0, lt=1, description="the clip range of the probability ratio")
    num_iterations: int = Field(1, ge=1, description="optimizer steps per generation (TRL's num_iterations): each "
                                "batch of prompts is sampled once and trained on this many steps in a row, the "
                                "ratio to the policy that sampled it clipped by epsilon")
    kl_coef: float = Field(0.0, ge=0, description="weight of the KL penalty to the reference (TRL's beta); 0 holds "
                           "no reference")
    scale_rewards: bool = Field(True, description="divide each advantage by its group's reward std (GRPO); false "
                                "leaves it at reward - group mean (Dr. GRPO)")
    loss_normalization: Literal["token", "sequence"] = Field(
        "token", description="token: the per-token losses summed over the micro-batch, over its completion tokens "
        "(DAPO, TRL's default); sequence: each completion's mean, then their mean (the original GRPO)")
    reward_model: str | None = Field(None, description="a reward model (a reward stage's export: a sequence "
                                     "classifier with one output), a path or stage:NAME, held frozen as the "
                                     "engine holds the policy; it scores prompt + completion")
    reward_functions: list[Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]] = Field(
        [], description="module:function, TRL's signature fn(prompts, completions, **fields) -> list of floats "
        "(the module importable from where the run starts, or on PYTHONPATH)")
    reward_weights: list[float] | None = Field(None, description="a weight per reward: each reward function in "
                                               "order, then the reward model (default: 1 each)")
    disable_dropout: bool = Field(True, description="turn the policy's dropout off (as TRL's option does)")
    samples_logged: int = Field(4, ge=0, description="completions (with their rewards) written at each "
                                "evaluation to samples/step_N.jsonl and the W&B table")

    def rows(self) -> int:
        return self.group_size

    def updates_per_batch(self) -> int:
        return self.num_iterations

    def row_tokens(self) -> int:
        return self.seq_len + self.max_new_tokens

    def generates(self) -> bool:
        return True

    def frozen_copy(self) -> bool:
        return self.reference_kind() == "model"

    def reference_kind(self) -> str | None:
        """lora/qlora: the policy with its adapters off; full: a frozen copy; none when kl_coef is 0."""
        if not self.kl_coef:
            return None
        return "adapter" if self.trains.adapter else "model"

    def reward_names(self) -> list[str]:
        """The rewards in weight order: each function's name, then `reward_model`."""
        return [f.split(":")[1] for f in self.reward_functions] + (["reward_model"] if self.reward_model else [])

    def weights(self) -> list[float]:
        return list(self.reward_weights) if self.reward_weights is not None else [1.0] * len(self.reward_names())

    def record_fields(self, record: dict) -> list[str]:  # noqa: ARG002
        return [self.prompt_field]

    def other_models(self) -> list[tuple[str, str]]:
        return [("finetune.reward_model", self.reward_model)] if self.reward_model else []

    def other_model_problem(self, field: str, config: dict) -> str | None:  # noqa: ARG002 - one other model
        return sequence_classifier_problem(config)

    def model_problem(self, config: dict) -> str | None:
        """The prompt and a whole completion must fit the model's positions."""
        positions = config.get("max_position_embeddings")
        if isinstance(positions, int) and self.seq_len + self.max_new_tokens > positions:
            return (f"seq_len {self.seq_len} (the prompt) + max_new_tokens {self.max_new_tokens} is past the model's "
                    f"{positions} positions (config.json max_position_embeddings)")
        return None

    def import_problems(self) -> list[tuple[str, str]]:
        from hpctrain.launcher.contract.user_code import import_problem

        out = []
        for i, name in enumerate(self.reward_functions):
            problem = import_problem(name)
            if problem:
                out.append((f"finetune.reward_functions.{i}", problem))
        return out

    @model_validator(mode="after")
    def _some_reward(self) -> GrpoSpec:
        n = len(self.reward_names())
        if not n:
            raise ValueError("finetune: grpo needs a reward: reward_model (a path or stage:NAME) and/or "
                             "reward_functions (module:function)")
        if self.reward_weights is not None and len(self.reward_weights) != n:
            raise ValueError(f"finetune.reward_weights has {len(self.reward_weights)} weight(s) for {n} reward(s) "
                             f"({', '.join(self.reward_names())}: the functions in order, then the reward model)")
        return self


class Seq2SeqSpec(ScoresGenerations, FinetuneBase):
    """Sequence to sequence: an encoder-decoder model (Marian, T5, BART, mBART) learns source ->
    target (translation, summarisation); the loss is on the target tokens, and evaluation
    generates each validation source and scores it against its target."""

    MODEL_CLASS: ClassVar[str] = "AutoModelForSeq2SeqLM"
    METRICS: ClassVar[dict[str, bool]] = {"loss": False, **GENERATION_METRICS}
    DEFAULT_BEST: ClassVar[str] = "bleu"

    kind: Literal["seq2seq"] = Field(description=KIND_HELP)
    source_field: str = Field("source", description="the source text field (JSONL, CSV column; a TSV's first column)")
    target_field: str = Field("target", description="the target text field (a TSV's second column)")
    seq_len: int | None = Field(None, description="not used by seq2seq (source_len, target_len)")
    source_len: int = Field(128, gt=1, description="source tokens at most (longer ones are truncated and counted)")
    target_len: int = Field(128, gt=1, description="target tokens at most (longer ones are truncated and counted)")
    metrics: list[TextMetric] = Field(
        ["bleu", "chrf"], description="what generated text is scored with at each evaluation (corpus-level; "
        "[] generates nothing): bleu, chrf (sacrebleu), rougeL (summaries)")

    def scored(self) -> list[str]:
        return list(self.metrics)

    def default_best(self) -> str:
        return self.metrics[0] if self.metrics else "loss"

    def truncation_note(self) -> str:
        return f"truncated (source_len {self.source_len}, target_len {self.target_len})"

    def row_tokens(self) -> int:
        return max(self.source_len, self.target_len)

    def max_new_tokens(self) -> int:
        return self.generation.max_new_tokens or self.target_len

    def record_fields(self, record: dict) -> list[str]:  # noqa: ARG002
        return [self.source_field, self.target_field]

    def csv_columns(self) -> list[str]:
        return [self.source_field, self.target_field]

    def tsv_columns(self) -> list[str]:
        return [self.source_field, self.target_field]

    def model_problem(self, config: dict) -> str | None:
        positions = config.get("max_position_embeddings")
        longest = max(self.source_len, self.target_len, self.max_new_tokens())
        if isinstance(positions, int) and positions and longest > positions and config.get("model_type") != "t5":
            return (f"source_len / target_len / generation.max_new_tokens ({longest}) is past the model's "
                    f"{positions} positions (config.json max_position_embeddings)")
        return None

    @model_validator(mode="after")
    def _no_seq_len(self) -> Seq2SeqSpec:
        if self.seq_len is not None:
            raise ValueError("finetune.seq_len: kind seq2seq counts source_len and target_len")
        return self


KINDS: dict[str, type[FinetuneBase]] = {"sft": SftSpec, "classify": ClassifySpec, "reward": RewardSpec,
                                        "dpo": DpoSpec, "grpo": GrpoSpec, "seq2seq": Seq2SeqSpec}
"""Every fine-tuning kind by its `kind` value."""

FinetuneSpec = Annotated[SftSpec | ClassifySpec | RewardSpec | DpoSpec | GrpoSpec | Seq2SeqSpec,
                         Field(discriminator="kind")]
"""The `finetune` section: the class of its `kind`."""
