"""The run spec: typed, validated once at the edge, frozen into the run directory.

Pydantic models with `extra="forbid"`: an unknown key is an error with a
"did you mean" hint, and every error names the file, the dotted field path and
what was expected. Each field's description feeds `hpctrain spec --help`-style
docs and the error messages.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from hpctrain.launcher.contract.errors import UserError, UserErrors
from hpctrain.launcher.contract.finetune import KINDS, FinetuneSpec
from hpctrain.launcher.contract.paths import hub_id
from hpctrain.launcher.contract.schema import MANY, ONE, UNION_TAGS, Strict, metric_key, named_once

__all__ = ["RunSpec", "FinetuneSpec", "metric_key", "load_spec", "spec_from_dict"]


class ModelSpec(Strict):
    path: str | None = Field(
        None, description="local Hugging Face model directory (or pkg:PACKAGE/dir) to start from, or a Hub id "
        "org/name[@revision]: pinned to its commit sha and downloaded by run/submit, never on a compute node"
    )
    config: dict[str, Any] | None = Field(
        None,
        description="architecture config to start from scratch, e.g. {model_type: llama, hidden_size: 64, ...}",
    )
    tokenizer: str | None = Field(None, description="tokenizer directory; defaults to model.path")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="dtype the weights are kept in")
    hub_cache: str | None = Field(
        None, description="where Hub models (a path of the form org/name[@revision]) are downloaded at submit; on a "
        "file system the compute nodes see (default: HF_HUB_CACHE, else HF_HOME/hub)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of model.path or model.config")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs model_type (e.g. llama, gpt2, bert)")
        if self.path is None and self.tokenizer is None:
            raise ValueError("model.tokenizer is required when starting from model.config")
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path  # type: ignore[return-value]


class HubPin(Strict):
    """A Hub model as `run`/`submit` pinned it: written into the frozen spec, never by hand."""

    id: str = Field(description="the Hub repo id (org/name)")
    revision: str = Field(description="the revision the spec asked for (branch, tag or sha)")
    sha: str = Field(pattern=r"^[0-9a-f]{40}$", description="the commit that revision named when the run was pinned")


class ObjectiveSpec(Strict):
    type: Literal["clm", "mlm"] = Field(
        "clm", description="clm: causal LM (decoders); mlm: masked LM (encoders)"
    )
    mask_prob: float = Field(0.15, gt=0, lt=1, description="mlm: share of tokens masked")


class CorpusRef(Strict):
    path: str = Field(
        description="corpus directory from `hpctrain prepare` (or a Megatron .bin/.idx prefix)"
    )
    weight: float = Field(1.0, ge=0, description="blend weight (normalized over all corpora)")
    split: str = Field("train", description="split of the corpus to train on")


class ValidationRef(Strict):
    path: str = Field(description="corpus directory holding the validation split")
    split: str = Field("valid", description="split name")


class NamedValidation(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="the set's name in metrics (val/<name>/loss), the console and plots")
    path: str = Field(description="corpus directory holding the validation split")
    split: str = Field("valid", description="split name")


@dataclass(frozen=True)
class ValidationSet:
    """One validation corpus of a run: its name (None for the single unnamed form), where it is,
    the spec field to name in errors, and the metric keys it is logged under."""

    name: str | None
    path: str
    split: str
    field: str

    def key(self, what: str) -> str:
        return metric_key(self.name, what)


class DataSpec(Strict):
    corpora: list[CorpusRef] = Field(
        min_length=1, description="training corpora, blended by weight"
    )
    seq_len: int = Field(gt=1, description="tokens per training sequence")
    validation: Annotated[
        Annotated[ValidationRef, Tag(ONE)] | Annotated[list[NamedValidation], Tag(MANY)],
        Discriminator(lambda v: MANY if isinstance(v, list) else ONE),
    ] | None = Field(
        None, description="validation corpus (optional): one {path, split}, or a list of named sets "
        "{name, path, split}, each evaluated at every eval_every and logged as val/<name>/loss"
    )
    document_mask: bool = Field(
        False, description="a token attends only within its own document of a packed sample, positions "
        "restart at each document, and no token is predicted across a document boundary (clm, mlm)"
    )
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes per rank (0: read in the trainer)"
    )

    def validation_sets(self) -> list[ValidationSet]:
        v = self.validation
        if v is None:
            return []
        if isinstance(v, ValidationRef):
            return [ValidationSet(None, v.path, v.split, "data.validation.path")]
        return [ValidationSet(x.name, x.path, x.split, f"data.validation.{i}.path") for i, x in enumerate(v)]

    @model_validator(mode="after")
    def _named_once(self) -> DataSpec:
        if isinstance(self.validation, list):
            if not self.validation:
                raise ValueError("data.validation is an empty list: give at least one {name, path} or leave it out")
            named_once([x.name for x in self.validation], "data.validation", "validation sets")
        return self

    @model_validator(mode="after")
    def _some_weight(self) -> DataSpec:
        if not any(c.weight > 0 for c in self.corpora):
            raise ValueError("every blend weight (data.corpora.N.weight) is zero: at least one "
                             "corpus needs a weight above 0")
        return self


class TrainingSpec(Strict):
    global_batch: int = Field(gt=0, description="sequences per optimizer step over all ranks")
    micro_batch: int = Field(gt=0, description="sequences per forward/backward on one rank")
    steps: int | None = Field(
        None, gt=0, description="optimizer steps to train (or give tokens, or epochs)"
    )
    tokens: int | None = Field(
        None, gt=0, description="token budget; steps = ceil(tokens / (global_batch * seq_len))"
    )
    epochs: float | None = Field(
        None,
        gt=0,
        description="passes over the training data; steps = ceil(epochs * samples / global_batch), "
        "samples = training examples (finetune) or packed samples of all corpora (pretrain); "
        "times finetune.num_iterations for grpo",
    )
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="final LR as a share of the peak (cosine/linear)"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="LR decay after warmup"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float | None = Field(
        1.0, gt=0, description="max global grad norm (null: no clipping)"
    )
    seed: int = Field(1234, ge=0, description="seed for init, data order and masking")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="autocast precision of forward/backward"
    )
    compile: bool = Field(
        False, description="torch.compile the model (ddp engine; the first steps compile, minutes on a CPU)"
    )
    kernels: Literal["auto", "liger", "torch"] = Field(
        "auto", description="fused GPU kernels: liger (Liger-Kernel's RMSNorm, RoPE, SwiGLU; CUDA only, "
        "extra 'gpu'), torch (PyTorch's own), auto (liger where CUDA, the package and the architecture "
        "allow, else torch)"
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="recompute transformer blocks' activations in the backward instead of "
        "keeping them: full (every block) or selective (every k-th block, activation_checkpointing_every); "
        "less memory for about a third more compute, the same losses"
    )
    activation_checkpointing_every: int = Field(
        2, gt=0, description="selective activation checkpointing: every k-th block (k=1 is full)"
    )
    eval_every: int | None = Field(None, gt=0, description="steps between validation passes")
    eval_batches: int = Field(4, gt=0, description="micro-batches per rank in a validation pass")
    log_every: int = Field(1, gt=0, description="steps between progress lines")

    @model_validator(mode="after")
    def _budget(self) -> TrainingSpec:
        given = [k for k in ("steps", "tokens", "epochs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of training.steps, training.tokens or training.epochs"
                + (f" (got {' and '.join(given)})" if given else "")
            )
        return self


class CheckpointSpec(Strict):
    every_steps: int | None = Field(None, gt=0, description="save every N steps")
    every_minutes: Annotated[float, Field(gt=0)] | Literal["auto"] | None = Field(
        None, description="save every M minutes of training; auto: the Young-Daly interval sqrt(2 C MTBF) from "
        "what a save measured to cost (C) and mtbf_hours, chosen again at every save")
    mtbf_hours: float = Field(24.0, gt=0, description="every_minutes auto: the expected hours between "
                              "interruptions (preemptions, failures, time limits) until the run has seen its own; "
                              "then (mtbf_hours + hours trained) / (1 + interruptions)")
    keep_last: int = Field(
        2, ge=1, description="complete checkpoints kept (older ones are deleted)"
    )
    background: bool = Field(
        True,
        description="training goes on while a thread writes the checkpoint (blocked only for a copy "
        "to host memory; fsdp: each rank's shards, through DCP's async save); DeepSpeed engines save "
        "synchronously",
    )


SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY")


def _one_line(value: str, what: str) -> str:
    # a newline in an #SBATCH line would end the comment and start a shell command
    if any(c in value for c in "\n\r\0"):
        raise ValueError(f"{what} must be one line (no newline or NUL characters)")
    return value


CONTAINER_RUNTIMES = ("pyxis", "apptainer", "bubblewrap")


class ContainerSpec(Strict):
    """Where each node task starts its torchrun: inside a container (launcher/container.py)."""

    runtime: Literal["pyxis", "apptainer", "bubblewrap"] = Field(
        description="pyxis/enroot (srun --container-image), Apptainer/Singularity (apptainer exec), or "
        "bubblewrap: the host's own file system in a PID namespace without Slurm's commands (a stand-in "
        "for tests and for clusters without a runtime)"
    )
    image: str | None = Field(
        None, description="pyxis: an enroot image or registry reference (nvcr.io#nvidia/pytorch:24.05-py3); "
        "apptainer: a .sif file or a docker:// / library:// / oras:// URI; bubblewrap: none"
    )
    mounts: list[str] = Field(
        default_factory=list, description="HOST:CONTAINER[:ro] folders the trainers need (data, models, caches); "
        "the run dir is always mounted at its own path"
    )
    workdir: str | None = Field(None, description="working directory inside the container")
    env: list[str] = Field(
        default_factory=list, description="names of further environment variables passed in (values stay in "
        "the environment, never on a command line); hpctrain's own and the usual ones pass without this"
    )
    python: str | None = Field(
        None, description="Python inside the container with hpctrain and torch installed (default: python; "
        "bubblewrap: the Python running hpctrain)"
    )

    @model_validator(mode="after")
    def _well_formed(self) -> ContainerSpec:
        if self.runtime == "bubblewrap":
            if self.image is not None:
                raise ValueError("cluster.container.image: bubblewrap runs the host's own file system; "
                                 "give no image")
        elif not self.image:
            raise ValueError(f"cluster.container.image is required for runtime {self.runtime}")
        for m in self.mounts:
            parts = _one_line(m, "each cluster.container.mounts entry").split(":")
            if "," in m or not 2 <= len(parts) <= 3 or not all(parts[:2]) or \
                    not parts[1].startswith("/") or parts[2:] not in ([], ["ro"], ["rw"]):
                raise ValueError(f"cluster.container.mounts: {m!r} is not HOST:CONTAINER[:ro] (CONTAINER an "
                                 "absolute path, no commas)")
        for name in self.env:
            if not name.isidentifier():
                raise ValueError(f"cluster.container.env: '{name}' is not a variable name")
        for name in ("image", "workdir", "python"):
            if getattr(self, name) is not None:
                _one_line(getattr(self, name), f"cluster.container.{name}")
        return self

    @property
    def local_image(self) -> bool:
        """An Apptainer image named by a path on the shared file system (not a URI)."""
        return self.runtime == "apptainer" and "://" not in (self.image or "")


class ClusterSpec(Strict):
    executor: Literal["local", "slurm"] = Field(
        "local", description="where the job runs: this machine or Slurm"
    )
    nodes: int = Field(1, ge=1, description="nodes")
    procs_per_node: int = Field(1, ge=1, description="trainer processes (GPUs) per node")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend"
    )
    rank_start: Literal["auto", "fork", "exec"] = Field(
        "auto", description="how torchrun starts the ranks of a node: fork (from one process that "
        "imported torch and transformers once), exec (a fresh interpreter each), or auto: fork on "
        "nodes without a GPU, exec on GPU nodes"
    )
    # --- Slurm (used by `hpctrain submit`)
    job_name: str | None = Field(None, description="Slurm job name (default: the run name)")
    partition: str | None = Field(None, description="Slurm partition")
    account: str | None = Field(None, description="Slurm account")
    qos: str | None = Field(None, description="Slurm quality of service")
    constraint: str | None = Field(None, description="Slurm node constraint")
    exclusive: bool = Field(False, description="whole nodes for this job")
    gpus_per_node: int = Field(0, ge=0, description="GPUs requested per node (0 on CPU clusters)")
    cpus_per_task: int | None = Field(
        None, ge=1, description="CPUs for each node task (torchrun and its ranks); default: the whole "
        "node with exclusive: true, else procs_per_node x cpus_per_rank"
    )
    cpus_per_rank: int | None = Field(
        None, ge=1, description="CPUs per trainer rank when cpus_per_task is not given (default: "
        "1 + data.num_workers: the rank and its loader workers)"
    )
    mem_gb: float | None = Field(None, gt=0, description="memory per node in GB")
    device_memory_gb: float | None = Field(
        None, gt=0, description="memory of one GPU in GB: `validate` and `plan` check that the run "
        "fits (default: this machine's GPU, or on CPU its available memory / procs_per_node)"
    )
    time_min: int = Field(
        60, ge=1, description="wall-time limit of one job (one requeue cycle) in minutes"
    )
    signal_lead_s: int = Field(
        120, ge=10, description="Slurm sends USR2 this many seconds before the time limit"
    )
    retries_on_failure: int = Field(
        0, ge=0, description="restart a failed attempt (a lost node, an OOM kill) from the newest checkpoint "
        "up to this many times; the same step failing twice in a row stops retrying"
    )
    max_requeues: int = Field(
        3, ge=0, description="requeues after a time-out (preemptions do not count)"
    )
    max_excluded_nodes: int = Field(
        2, ge=0, description="nodes an attempt died or hung on are left out of the run's later attempts and jobs "
        "(sbatch --exclude), up to this many; 0 leaves none out"
    )
    sbatch_extra: dict[str, str] = Field(
        default_factory=dict, description="extra sbatch options, e.g. {reservation: x}"
    )
    setup: list[str] = Field(
        default_factory=list,
        description="shell lines run before the job (module load, venv activate)",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="environment variables for the job (no secrets)"
    )
    container: ContainerSpec | None = Field(
        None, description="run each node task's trainers inside a container (Slurm only; docs/slurm.md)"
    )

    @model_validator(mode="after")
    def _safe_values(self) -> ClusterSpec:
        for name in ("job_name", "partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value is not None:
                _one_line(value, f"cluster.{name}")
        for k, v in self.sbatch_extra.items():
            _one_line(k, "cluster.sbatch_extra keys")
            _one_line(v, f"cluster.sbatch_extra.{k}")
        for line in self.setup:
            _one_line(line, "each cluster.setup entry")
        for k, v in self.env.items():
            if not k.isidentifier():
                raise ValueError(f"cluster.env: '{k}' is not a valid variable name")
            if k.upper() in SECRET_ENV:
                raise ValueError(
                    f"cluster.env: {k} is a secret; export it in your shell (jobs inherit it), "
                    "never put it in a spec"
                )
            _one_line(v, f"cluster.env.{k}")
        if self.container is not None and self.executor != "slurm":
            raise ValueError("cluster.container: a container is for Slurm jobs (executor: slurm, hpctrain "
                             "submit); a local run trains on this machine as it is")
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


class EngineSpec(Strict):
    type: Literal["ddp", "deepspeed", "fsdp"] = Field(
        "ddp", description="ddp: PyTorch DDP (a full replica per rank); deepspeed: DeepSpeed ZeRO; "
        "fsdp: PyTorch FSDP2 (parameters, gradients and optimizer state sharded over the ranks)"
    )
    zero_stage: Literal[1, 2, 3] | None = Field(
        None,
        description="ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters "
        "(default 2, or the stage in engine.config)",
    )
    offload_optimizer: Literal["none", "cpu"] | None = Field(
        None, description="keep optimizer states (and the step) in CPU memory"
    )
    offload_params: Literal["none", "cpu"] | None = Field(
        None, description="ZeRO-3 or fsdp: keep parameters (fsdp: and optimizer state) in CPU memory "
        "between uses"
    )
    reshard_after_forward: bool = Field(
        True, description="fsdp: free a block's gathered parameters after its forward and gather them "
        "again for its backward (less memory, one more all-gather per block)"
    )
    config: str | None = Field(
        None,
        description="your own DeepSpeed JSON; values the spec owns (batch sizes, clipping, "
        "precision) are filled in, and a conflicting value is an error",
    )

    @model_validator(mode="after")
    def _fields_of_the_engine(self) -> EngineSpec:
        ds_only = [k for k in ("zero_stage", "offload_optimizer", "config") if getattr(self, k) is not None]
        if self.type != "deepspeed" and ds_only:
            hint = (" (fsdp shards parameters, gradients and optimizer state as ZeRO-3 does, and offloads"
                    " with engine.offload_params: cpu; drop the DeepSpeed fields)") if self.type == "fsdp" else ""
            raise ValueError(f"engine.{ds_only[0]} needs engine.type: deepspeed{hint}")
        if self.type == "ddp" and self.offload_params is not None:
            raise ValueError("engine.offload_params needs engine.type: deepspeed or fsdp")
        if self.type != "fsdp" and not self.reshard_after_forward:
            raise ValueError("engine.reshard_after_forward needs engine.type: fsdp")
        if self.offload_params == "cpu" and self.zero_stage not in (3, None):
            raise ValueError("engine.offload_params needs engine.zero_stage: 3")
        if self.offload_optimizer == "cpu" and self.zero_stage == 1:
            raise ValueError("engine.offload_optimizer needs engine.zero_stage: 2 or 3 (offload is "
                             "built and tested here with the gradient partitioning of stage 2 and 3)")
        return self


class WandbSpec(Strict):
    mode: Literal["online", "offline", "disabled"] = Field(
        "disabled", description="online: stream to W&B; offline: write RUN_DIR/wandb/ (upload later "
        "with `hpctrain sync`); disabled: metrics.jsonl only"
    )
    project: str | None = Field(None, description="W&B project (default: the run name)")
    entity: str | None = Field(None, description="W&B entity (user or team)")
    group: str | None = Field(None, description="W&B group (default: the pipeline's name for its stages)")
    tags: list[str] = Field(default_factory=list, description="W&B tags")


class MonitorSpec(Strict):
    wandb: WandbSpec = Field(WandbSpec(), description="Weights & Biases (one run per run dir)")
    hang_timeout_s: float | None = Field(
        None, gt=0, description="the hang watchdog's limit: no step within it dumps every rank's stacks, "
        "records status 'hung' and ends the job (default: 10 x the median step time, at least 5 minutes)"
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="peak TFLOP/s of one device for MFU (default: a table of common GPUs; "
        "on CPU only achieved TFLOP/s is reported)"
    )


class ExportSpec(Strict):
    enabled: bool = Field(
        True, description="save the final model in HF format under RUN_DIR/export"
    )
    max_shard_mib: float = Field(
        5000, gt=0, description="largest safetensors file of an export, MiB; a larger model is split "
        "into several with HF's index (model.safetensors.index.json)"
    )


class RunSpec(Strict):
    name: str = Field(min_length=1, description="run name")
    run_dir: str | None = Field(None, description="run directory (default: runs/<name>)")
    task: Literal["pretrain", "finetune"] = Field("pretrain", description="continued pretraining or fine-tuning")
    model: ModelSpec
    objective: ObjectiveSpec = ObjectiveSpec()
    data: DataSpec | None = Field(None, description="token corpora (pretrain)")
    finetune: FinetuneSpec | None = Field(None, description="fine-tuning data and method (finetune)")
    training: TrainingSpec
    checkpoint: CheckpointSpec = CheckpointSpec()
    cluster: ClusterSpec = ClusterSpec()
    engine: EngineSpec = Field(EngineSpec(), description="ddp, deepspeed (ZeRO 1-3, offload) or fsdp")
    export: ExportSpec = ExportSpec()
    monitor: MonitorSpec = Field(MonitorSpec(), description="where metrics go besides metrics.jsonl")
    hub: dict[str, HubPin] = Field(
        {}, description="written by run/submit: each field that named a Hub model, the commit it was pinned to "
        "(its folder in the cache is what the field holds in the frozen spec)"
    )

    @model_validator(mode="after")
    def _task_sections(self) -> RunSpec:
        if self.task == "pretrain" and self.data is None:
            raise ValueError("task pretrain needs a data section (corpora, seq_len)")
        if self.task == "finetune":
            if self.finetune is None:
                raise ValueError("task finetune needs a finetune section (kind, method, train_file)")
            if self.training.tokens is not None:
                raise ValueError("task finetune counts training.steps or training.epochs (not tokens)")
            if self.finetune.trains.adapter and self.model.path is None:
                raise ValueError(f"{self.finetune.method} adapts saved weights: give model.path (a pretrained "
                                 "or exported model), or use method: full from model.config")
            if self.finetune.trains.virtual_tokens and self.engine.type != "ddp":
                raise ValueError(f"method {self.finetune.method} (prefix tuning) runs under engine.type: ddp (its "
                                 "virtual tokens are a few thousand parameters: nothing to shard)")
            if self.finetune.trains.quantized and self.engine.type == "fsdp":
                raise ValueError("qlora with engine.type: fsdp is not supported: bitsandbytes' packed 4-bit "
                                 "weights cannot be sharded by FSDP2 here; use engine.type: ddp or deepspeed")
        if self.training.compile and self.engine.type != "ddp":
            raise ValueError("training.compile needs engine.type: ddp (DeepSpeed compiles through its own config)")
        return self

    @property
    def quantized(self) -> bool:
        """The model's base is loaded in 4 bits (a QLoRA fine-tune)."""
        return self.finetune is not None and self.task == "finetune" and self.finetune.trains.quantized

    @property
    def run_path(self) -> str:
        return self.run_dir or str(Path("runs") / self.name)

    @property
    def seq_len(self) -> int:
        if self.task == "finetune":  # seq2seq has none: its longest side
            return self.finetune.seq_len or self.finetune.row_tokens()  # type: ignore[union-attr]
        return self.data.seq_len  # type: ignore[union-attr]

    @property
    def rows_per_example(self) -> int:
        """Sequences one example puts through the model (2 for a preference pair, a GRPO group)."""
        return self.finetune.rows() if self.task == "finetune" else 1  # type: ignore[union-attr]

    @property
    def model_class(self) -> str:
        """The transformers Auto class the model is built with: chosen here only."""
        if self.task == "finetune":
            return self.finetune.MODEL_CLASS  # type: ignore[union-attr]
        return "AutoModelForCausalLM" if self.objective.type == "clm" else "AutoModelForMaskedLM"

    @property
    def trainer_module(self) -> str:
        return "hpctrain.trainers.finetune" if self.task == "finetune" else "hpctrain.trainers.pretrain"

    @property
    def total_steps(self) -> int:
        """Optimizer steps of a steps- or tokens-budgeted run (epochs: see `total_steps_for`)."""
        return self.total_steps_for(None)

    def total_steps_for(self, samples_per_epoch: int | None) -> int:
        """Optimizer steps of the run; an epochs budget needs the samples in one epoch."""
        t = self.training
        if t.steps is not None:
            return t.steps
        if t.tokens is not None:
            return math.ceil(t.tokens / (t.global_batch * self.seq_len))
        if samples_per_epoch is None:
            raise ValueError("training.epochs needs the number of samples in one epoch")
        per_batch = self.finetune.updates_per_batch() if self.finetune is not None else 1
        return max(1, math.ceil(t.epochs * samples_per_epoch / t.global_batch)) * per_batch

    @property
    def grad_accum(self) -> int:
        return self.training.global_batch // (self.training.micro_batch * self.cluster.world_size)


# ------------------------------------------------------------------ loading


def with_absolute_paths(spec: RunSpec, base: Path | None = None) -> RunSpec:
    """Relative paths resolved against `base` (the launch directory), so the frozen spec
    means the same thing from any working directory (a Slurm job's, a later resume's)."""
    base = base or Path.cwd()

    def fix(field: str, p: str | None) -> str | None:
        if p is None or p.startswith("pkg:") or hub_id(p, base):
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    data = _map_input_paths(spec, fix)
    data["run_dir"] = fix("run_dir", spec.run_path)
    if spec.cluster.container is not None:
        box = data["cluster"]["container"]
        if spec.cluster.container.local_image:
            box["image"] = fix("cluster.container.image", box["image"])
        box["mounts"] = [":".join([fix("cluster.container.mounts", host), *rest])
                         for host, *rest in (m.split(":") for m in box["mounts"])]
    return RunSpec.model_validate(data)


def input_paths(spec: RunSpec) -> list[tuple[str, str]]:
    """(field, value) of every file or folder the trainers read (models, tokenizer, data, configs)."""
    seen: list[tuple[str, str]] = []

    def note(field: str, p: str | None) -> str | None:
        if p is not None:
            seen.append((field, p))
        return p

    _map_input_paths(spec, note)
    return seen


def _map_input_paths(spec: RunSpec, fix: typing.Callable[[str, str | None], str | None]) -> dict:
    """The spec as a dict with `fix(field, value)` applied to each path the trainers read."""
    data = spec.model_dump()
    for key in ("path", "tokenizer", "hub_cache"):
        data["model"][key] = fix(f"model.{key}", data["model"][key])
    if data["data"]:
        for c in data["data"]["corpora"]:
            c["path"] = fix("data.corpora.path", c["path"])
        v = data["data"]["validation"]
        for ref in v if isinstance(v, list) else [v] if v else []:
            ref["path"] = fix("data.validation.path", ref["path"])
    data["engine"]["config"] = fix("engine.config", data["engine"]["config"])
    if data["finetune"]:
        data["finetune"]["train_file"] = fix("finetune.train_file", data["finetune"]["train_file"])
        v = data["finetune"]["valid_file"]
        if isinstance(v, list):
            for ref in v:
                ref["path"] = fix("finetune.valid_file.path", ref["path"])
        else:
            data["finetune"]["valid_file"] = fix("finetune.valid_file", v)
        if data["finetune"].get("reward_model"):
            data["finetune"]["reward_model"] = fix("finetune.reward_model", data["finetune"]["reward_model"])
    return data


def _unannotated(ann: Any) -> Any:
    """`ann` with Annotated wrappers taken off, also inside a union."""
    if typing.get_origin(ann) is Annotated:
        return _unannotated(typing.get_args(ann)[0])
    args = typing.get_args(ann)
    if args and typing.get_origin(ann) in (typing.Union, types.UnionType):
        return typing.Union[tuple(_unannotated(a) for a in args)]  # noqa: UP007
    return ann


def _models_in(ann: Any, in_list: bool = False) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation names (with `in_list`: only as list items)."""
    ann = _unannotated(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [] if in_list else [ann]
    if typing.get_origin(ann) is list:
        return _models_in(typing.get_args(ann)[0]) if in_list else []
    return [m for a in typing.get_args(ann) for m in _models_in(a, in_list)]


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (for did-you-mean hints); `loc` as
    pydantic gives it, with a union's tag after a field that takes one of several sections
    (`finetune.classify.labels`: the classify section)."""
    loc = tuple(p for p in loc if p not in UNION_TAGS)
    cur: type[BaseModel] | None = model
    i = 0
    while i < len(loc):
        part = loc[i]
        i += 1
        if isinstance(part, int):
            continue
        field = cur.model_fields.get(part) if cur is not None else None
        if field is None:
            return None
        nxt = loc[i] if i < len(loc) else None
        found = _models_in(field.annotation, in_list=isinstance(nxt, int)) or _models_in(field.annotation)
        if len(found) > 1 and nxt in KINDS and KINDS[nxt] in found:  # a kind's own section
            cur, i = KINDS[nxt], i + 1
            continue
        cur = found[0] if found else None
    return cur


def _shown(loc: tuple) -> tuple:
    """`loc` as the user wrote it: without the tags pydantic adds for unions."""
    return tuple(p for i, p in enumerate(loc)
                 if p not in UNION_TAGS and not (i and loc[i - 1] == "finetune" and p in KINDS))


def _errors_from(exc: ValidationError, file: str | None) -> UserErrors:
    out = []
    for err in exc.errors():
        raw = tuple(err["loc"])
        loc = _shown(raw)
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        kind = err["type"]
        if kind in ("union_tag_not_found", "union_tag_invalid"):  # the finetune section's kind
            tag = (err.get("ctx") or {}).get("tag")
            out.append(UserError("missing" if tag is None else f"unknown kind (got {tag!r})", file=file,
                                 field=f"{dotted}.kind", expected=f"one of {', '.join(KINDS)}"))
        elif kind == "extra_forbidden":
            owner = _model_at(RunSpec, raw[:-1])
            names = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
            mine = [k for k, c in KINDS.items() if c is owner]
            other = [k for k, c in KINDS.items() if c is not owner and str(loc[-1]) in c.model_fields]
            if mine and other:  # a field of another kind's section
                out.append(UserError(f"not a field of kind {mine[0]}",
                                     file=file, field=dotted, hint=f"it belongs to kind {' or '.join(other)}"))
                continue
            out.append(
                UserError(
                    "unknown key",
                    file=file,
                    field=dotted,
                    hint=f"did you mean '{close[0]}'?"
                    if close
                    else (f"known keys: {', '.join(names)}" if names else None),
                )
            )
        elif kind == "missing":
            owner = _model_at(RunSpec, raw[:-1])
            desc = (
                owner.model_fields[str(loc[-1])].description
                if owner and str(loc[-1]) in owner.model_fields
                else None
            )
            out.append(UserError("missing", file=file, field=dotted, expected=desc))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            out.append(UserError(f"{msg}{shown}", file=file, field=dotted))
    return UserErrors(out)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.lr=3e-4` -> (['training', 'lr'], 0.0003); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"bad override '{text}'", field="--set", expected="dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"value of '{key}' is not valid YAML: {e}", field="--set") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each `dotted.key=value`; a number in the path indexes a list (`data.corpora.0.weight`)."""
    for text in overrides:
        path, value = parse_override(text)
        cur: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(cur, list):
                if not part.isdigit() or int(part) >= len(cur):
                    raise UserError(f"no item {part} in a list of {len(cur)}", field="--set " + ".".join(path),
                                    expected=f"an index 0..{len(cur) - 1}")
                if last:
                    cur[int(part)] = value
                else:
                    cur = cur[int(part)]
                continue
            if not isinstance(cur, dict):
                raise UserError(f"'{path[i - 1]}' is not a section", field="--set " + ".".join(path))
            if last:
                cur[part] = value
            elif isinstance(cur.get(part), (dict, list)):
                cur = cur[part]
            elif part in cur:
                raise UserError(f"'{part}' is not a section", field="--set " + ".".join(path))
            else:
                cur = cur.setdefault(part, {})
    return data


def load_spec_dict(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError("spec file not found", file=str(p), expected="a YAML run spec")
    try:
        with open(p) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"not valid YAML: {e}", file=str(p)) from None
    if not isinstance(data, dict):
        raise UserError("the spec must be a mapping at the top level", file=str(p))
    return data


def spec_from_dict(data: dict, file: str | None = None) -> RunSpec:
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as e:
        raise _errors_from(e, file) from None
    problems = batch_problems(spec, file)
    if problems:
        raise UserErrors(problems)
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Read a YAML spec safely, apply `--set` overrides, validate; raises UserError(s)."""
    data = apply_overrides(load_spec_dict(path), overrides or [])
    return spec_from_dict(data, str(path))


def batch_problems(spec: RunSpec, file: str | None) -> list[UserError]:
    """Batch-size arithmetic that must hold before anything starts."""
    t, world = spec.training, spec.cluster.world_size
    out = []
    if t.global_batch % world:
        out.append(
            UserError(
                f"{t.global_batch} does not divide among {world} ranks ({spec.cluster.nodes} node(s) x "
                f"{spec.cluster.procs_per_node})",
                file=file,
                field="training.global_batch",
                expected=f"a multiple of {world}",
            )
        )
    elif (t.global_batch // world) % t.micro_batch:
        out.append(
            UserError(
                f"{t.micro_batch} does not divide the per-rank batch {t.global_batch // world}",
                file=file,
                field="training.micro_batch",
                expected=f"a divisor of {t.global_batch // world}",
            )
        )
    return out


def spec_to_yaml(spec: RunSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


# Fields a resumed run may change: the budget, checkpoint cadence, the number of
# ranks (the sampler resumes by global position) and loader workers.
RESUMABLE_CHANGES = (
    "monitor.",
    "training.steps",
    "training.tokens",
    "training.epochs",
    "training.micro_batch",
    "training.eval_every",
    "training.eval_batches",
    "training.log_every",
    "training.activation_checkpointing",  # and _every: a memory choice, the same losses
    "checkpoint.",
    "export.",  # what the end writes, not how training goes
    "cluster.",
    "data.num_workers",
    "run_dir",
)


def spec_differences(old: RunSpec, new: RunSpec) -> list[str]:
    """Dotted paths whose values differ between two specs."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    a, b = flat(old.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def forbidden_changes(old: RunSpec, new: RunSpec) -> list[str]:
    return [
        k
        for k in spec_differences(old, new)
        if not any(k == r or k.startswith(r) for r in RESUMABLE_CHANGES)
    ]
