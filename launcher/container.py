"""Trainers inside a container (`cluster.container`): pyxis/enroot, Apptainer, or bubblewrap.

The split: the node task (launcher/slurm.py: NodeTask) stays on the host, outside the container,
and only its torchrun runs inside. Everything that talks to Slurm stays on the host side:

- Slurm's USR2 and TERM reach the node task (inside pyxis or Apptainer the ranks may never get
  them: Apptainer's starter and srun's step forwarding have each been seen to drop them); the
  node task writes the attempt's stop file in the run dir, which the ranks poll at each step, so
  they save and exit as they do outside a container.
- The requeue (submitit's, or the node task's after a deadline or a failure) runs `scontrol`
  on the host: inside pyxis there is no `scontrol` (nor `sbatch`), so a job cannot requeue
  itself from inside.
- The ranks read the spec, data and models and write checkpoints under paths the container sees
  at the same place: the run dir is always mounted at its own path; `mounts` adds the rest.

The container gets a clean environment: a host's LD_LIBRARY_PATH or PYTHONPATH leaking into an
image is a classic cause of a broken import. What passes is what hpctrain sets for its ranks,
the variables the libraries read (PASSED_PREFIXES: W&B's key and mode, Hugging Face's cache and
token, thread counts, NCCL's settings), `cluster.env`, and the names in `container.env`. Values
never appear on a command line (they would show in `ps` and in the job's log): Apptainer gets
them as APPTAINERENV_NAME, pyxis through `srun --export=NAMES`, bubblewrap as its environment.

Runtimes, one command per node task:

- pyxis: `srun --overlap --nodes=1 --ntasks=1 --nodelist=THIS_NODE --container-image=IMAGE
  --container-mounts=RUN:RUN,... --export=NAMES python -m torch.distributed.run ...`: a step of
  its own on this node, inside the job's allocation (--overlap shares the node task's CPUs).
- apptainer: `apptainer exec --cleanenv [--nv] --bind RUN:RUN,... [--pwd DIR] IMAGE python -m
  torch.distributed.run ...` (--nv with cluster.gpus_per_node).
- bubblewrap: `bwrap --dev-bind / / --unshare-pid --proc /proc --die-with-parent`, Slurm's
  commands hidden (/dev/null bound over each): the host's own file system, with the limits a
  container runtime puts on the ranks. The local cluster's tests run it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.spec import ContainerSpec, RunSpec, input_paths

PASSED_PREFIXES = (
    "HPCTRAIN_", "WANDB_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "MKL_",
    "NCCL_", "TORCH_", "CUDA_", "MALLOC_",
)
PASSED_NAMES = ("PYTHONUNBUFFERED", "PYTHONHASHSEED", "GLIBC_TUNABLES", "NETRC")
HOST_BASICS = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER")  # bubblewrap: the host is its image
SLURM_COMMANDS = ("scontrol", "sbatch", "srun", "squeue", "scancel", "salloc")


def for_node_task(spec: RunSpec) -> dict | None:
    """What a node task needs to know of the container, as plain values (submitit pickles it):
    the container spec, with the names of `cluster.env` among those passed in, and whether GPUs come."""
    box = spec.cluster.container
    if box is None:
        return None
    dump = box.model_dump()
    dump["env"] = sorted(set(box.env) | set(spec.cluster.env))
    return {"spec": dump, "gpus": spec.cluster.gpus_per_node > 0}


def passed_names(container: dict, env: dict) -> list[str]:
    """The variables of `env` that enter the container (names only). `container`: for_node_task's."""
    wanted = set(container["spec"]["env"]) | set(PASSED_NAMES)
    return sorted(k for k in env if k in wanted or k.startswith(PASSED_PREFIXES))


def python_in(container: dict) -> str:
    box = container["spec"]
    return box["python"] or (sys.executable if box["runtime"] == "bubblewrap" else "python")


def wrap(container: dict, run_dir: str, cmd: list[str], env: dict, node: str) -> tuple[list[str], dict]:
    """The runtime's argv around `cmd` (a torchrun command line), and the runtime process's
    environment, which carries the values of the variables passed in. `container`: for_node_task's."""
    box, gpus = ContainerSpec.model_validate(container["spec"]), container["gpus"]
    names = passed_names(container, env)
    mounts = [f"{run_dir}:{run_dir}", *box.mounts]
    if box.runtime == "pyxis":
        argv = ["srun", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={node}",
                f"--container-image={box.image}", f"--container-mounts={','.join(mounts)}"]
        argv += [f"--container-workdir={box.workdir}"] if box.workdir else []
        return [*argv, f"--export={','.join(names) or 'NONE'}", *cmd], env
    if box.runtime == "apptainer":
        argv = ["apptainer", "exec", "--cleanenv", *(["--nv"] if gpus else []), "--bind", ",".join(mounts)]
        argv += ["--pwd", box.workdir] if box.workdir else []
        return [*argv, str(box.image), *cmd], {**env, **{f"APPTAINERENV_{k}": env[k] for k in names}}
    argv = ["bwrap", "--dev-bind", "/", "/", "--unshare-pid", "--proc", "/proc", "--die-with-parent"]
    for m in box.mounts:
        host, inside, *mode = m.split(":")
        argv += ["--ro-bind" if mode == ["ro"] else "--bind", host, inside]
    for c in SLURM_COMMANDS:
        if path := shutil.which(c, path=env.get("PATH")):
            argv += ["--ro-bind", "/dev/null", path]
    argv += ["--chdir", box.workdir] if box.workdir else []
    return [*argv, *cmd], {k: env[k] for k in [*names, *HOST_BASICS] if k in env}


def check_container(spec: RunSpec, file: str | None, errors: list[UserError], notes: list[str]) -> None:
    """What `submit` (and `validate`) check before anything is queued: the image file, each
    mount's host side, and bubblewrap on this machine."""
    box = spec.cluster.container
    if box is None:
        return
    if box.local_image and not Path(str(box.image)).is_file():
        errors.append(UserError(f"the image {box.image} does not exist", file=file, field="cluster.container.image",
                                expected="an Apptainer image file (.sif) on the shared file system, or a "
                                         "docker:// / library:// / oras:// URI"))
    for m in box.mounts:
        host = m.split(":")[0]
        if not Path(host).exists():
            errors.append(UserError(f"{m}: the host side {host} does not exist", file=file,
                                    field="cluster.container.mounts",
                                    expected="HOST:CONTAINER[:ro] with an existing HOST folder or file"))
    if box.runtime == "bubblewrap" and shutil.which("bwrap") is None:
        errors.append(UserError("bubblewrap (bwrap) is not installed on this machine", file=file,
                                field="cluster.container.runtime",
                                hint="apt-get install bubblewrap (slurm/start.sh installs it with the local cluster)"))
    where = f" ({box.image})" if box.image else ""
    notes.append(f"container: {box.runtime}{where}, run dir mounted at its own path"
                 + (f", mounts {', '.join(box.mounts)}" if box.mounts else ""))
    notes += unmounted_inputs(spec)


def unmounted_inputs(spec: RunSpec) -> list[str]:
    """Warnings for the inputs the trainers would not find inside the container: each is read at
    the path the frozen spec holds, so it must sit under the run dir or a mount at its own path
    (or be in the image). bubblewrap sees the host's whole file system."""
    box = spec.cluster.container
    if box is None or box.runtime == "bubblewrap":
        return []
    same = [Path(spec.run_path)] + [Path(h) for h, c, *_ in (m.split(":") for m in box.mounts) if h == c]
    return [f"warning: {field} {p} is under no mount at its own path (cluster.container.mounts): the "
            "trainers read it at that path inside the container, so the image must hold it"
            for field, p in input_paths(spec)
            if Path(p).is_absolute() and not any(Path(p).is_relative_to(m) for m in same)]


def node_name() -> str:
    """This node's Slurm name (the local cluster's nodes share one host name)."""
    return os.environ.get("SLURMD_NODENAME") or os.uname().nodename
