"""`hpctrain submit`: Slurm jobs through submitit, one task per node, each starting torchrun.

Preemption on Slurm, end to end (trainer side: trainers/preemption.py):

1. Slurm sends USR2 `signal_lead_s` before the time limit, or on preemption.
   Depending on ProctrackType it reaches only the node task or every process.
2. Every node task (`NodeTask.__call__`) writes the attempt's stop file, which
   its trainer ranks poll at each step boundary; torchrun ignores USR2; ranks
   also catch USR2 themselves. Then submitit's own handler runs.
3. On global rank 0 that handler calls `NodeTask.checkpoint()`, which waits for
   the local torchrun to exit (the collective save is complete by then) and
   only then returns the resubmission; submitit requeues (same job id) while
   timeouts remain (`max_requeues`). Preemptions do not use up the countdown.
4. The requeued job starts fresh: the trainer finds the newest complete
   checkpoint by scanning the run dir (never a path frozen in the pickle).
5. If no signal comes, the trainer still stops ahead of the job's end time
   (`--deadline`, read from squeue) and rank 0's node task requeues the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpctrain.launcher import bad_nodes, container, lock
from hpctrain.launcher.attempt import (
    Action,
    Outcome,
    after_attempt,
    attempt_outcome,
    record_after_failure,
)
from hpctrain.launcher.contract.diskfull import (
    disk_full_cause,
    disk_full_reason,
    free_reserve,
    keep_reserve,
)
from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.rundir import RunDir, atomic_write_text
from hpctrain.launcher.contract.spec import RunSpec
from hpctrain.launcher.contract.states import (
    State,
    mark_failed,
    mark_stopped,
    read_status,
)
from hpctrain.launcher.cpus import cpus_line, node_task_cpus
from hpctrain.launcher.node import (
    ENV_ROOM,
    build_torchrun_command,
    failure_reason,
    forks_ranks,
    show_command,
    start_torchrun,
)
from hpctrain.launcher.slurm_cmd import failure, slurm_command


def executor_parameters(spec: RunSpec) -> dict:
    """submitit SlurmExecutor parameters for a spec (pure)."""
    c = spec.cluster
    params: dict = {
        "job_name": c.job_name or spec.name,
        "nodes": c.nodes,
        "ntasks_per_node": 1,  # one node task per node; torchrun starts the ranks
        "time": c.time_min,
        "signal_delay_s": c.signal_lead_s,
        "additional_parameters": {"requeue": True, **c.sbatch_extra},
        # The batch shell itself would die of a USR2 that lands before srun has started the
        # tasks (Slurm then signals the batch step): ignore it there; tasks get their own.
        "setup": ["trap '' USR2"]
        # srun of Slurm 22.05-23.02 does not inherit sbatch's --cpus-per-task: say it again
        + [f"export SRUN_CPUS_PER_TASK={cpus_line(spec)}"]
        + [f"export {k}={shlex.quote(v)}" for k, v in sorted(c.env.items())]
        + list(c.setup),
    }
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(c, name) is not None:
            params[name] = getattr(c, name)
    if node_task_cpus(spec) is not None:
        params["cpus_per_task"] = node_task_cpus(spec)
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    if c.mem_gb is not None:
        params["mem"] = f"{int(c.mem_gb * 1024)}MB"
    if c.exclusive:
        params["exclusive"] = True
    return params


def node_task_python() -> str:
    """How srun starts Python on each node (submitit appends `-u -m submitit.core._submit DIR`).

    Through hpctrain.launcher.slurm_entry, so that a USR2 that lands before submitit's handler
    is in place is recorded and replayed, not fatal. Before that, Python is still starting up
    (0.1 s, longer on a loaded node), where USR2's default action would kill the node task and
    leave the other nodes' torchrun waiting for it: /bin/sh ignores USR2 and execs Python, and
    an ignored signal stays ignored through exec until slurm_entry installs its handler. A USR2
    in that window is dropped on that node only: the stop file another node writes reaches the
    trainers all the same, and node 0 requeues a run its trainers stopped.
    """
    return f"/bin/sh -c 'trap \"\" USR2; exec \"$0\" \"$@\"' {shlex.quote(sys.executable)} -u -m hpctrain.launcher.slurm_entry"


def slurm_missing() -> str | None:
    """Which of Slurm's commands this machine lacks (a laptop where specs are written), or None."""
    import shutil

    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    return " and ".join(missing) or None


def require_slurm(spec_file: str | None = None) -> None:
    """A submit needs Slurm's commands here: without them, one line (exit 2) before anything is written."""
    missing = slurm_missing()
    if missing:
        raise UserError(f"no Slurm on this machine ({missing} not found on PATH)", file=spec_file,
                        field="cluster.executor",
                        hint="submit from a login node of the cluster; `hpctrain submit SPEC --dry-run` shows the "
                             "job here, `hpctrain run SPEC` trains on this machine")


def make_executor(spec: RunSpec, run_dir: Path, dependency: str | None = None):
    import submitit

    if slurm_missing():  # only a dry run gets here: submitit's check for srun would refuse to build the script
        class ScriptOnly(submitit.SlurmExecutor):
            @classmethod
            def affinity(cls) -> int:
                return 2

        factory = ScriptOnly
    else:
        factory = submitit.SlurmExecutor
    ex = factory(
        folder=RunDir(run_dir).slurm,
        max_num_timeout=spec.cluster.max_requeues,
        python=node_task_python(),
    )
    params = executor_parameters(spec)
    if dependency:
        params["dependency"] = dependency
    left_out = [e.host for e in bad_nodes.excluded(run_dir)]
    if left_out:  # nodes earlier attempts of this run died or hung on
        extra = params["additional_parameters"]
        mine = [h for h in extra.get("exclude", "").split(",") if h]  # the spec's own sbatch_extra.exclude
        extra["exclude"] = ",".join(dict.fromkeys(mine + left_out))
    ex.update_parameters(**params)
    return ex


def sbatch_script(executor) -> str:
    """The exact sbatch script submitit will write for this executor."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(
        command=executor._submitit_command_str, folder=executor.folder, **executor.parameters
    )


def test_only(spec: RunSpec) -> str:
    """Ask Slurm whether it would accept this job (`sbatch --test-only`), without submitting."""
    import shutil
    import tempfile

    if shutil.which("sbatch") is None:
        return "skipped (no sbatch on this machine)"
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "job.sh"
        script.write_text(sbatch_script(make_executor(spec, Path(tmp))))
        r = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
    text = (r.stderr + r.stdout).strip()
    if r.returncode != 0:
        raise UserError(f"sbatch --test-only refused the job: {text}", field="cluster",
                        expected="partition, account, qos, time and sizes the cluster accepts")
    return text


def rendezvous_port(job_id: int, restart: int) -> int:
    """The torchrun rendezvous port of one attempt of a job: every node task of the attempt
    computes the same one, and a requeued attempt gets another, since the previous attempt's
    store can still hold its port while the job starts again on the same node (seen under load:
    EADDRINUSE and the requeued job failed)."""
    return 20000 + (job_id * 16 + restart % 16) % 20000


def _restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def job_end_time(job_id: str) -> float | None:
    """Epoch seconds when Slurm will end this job (None when unknown or unlimited)."""
    try:
        out = slurm_command(["squeue", "-h", "-j", job_id, "-o", "%e"], timeout=30).stdout.strip()
        return time.mktime(time.strptime(out, "%Y-%m-%dT%H:%M:%S"))
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def hostnames(nodelist: str) -> list[str]:
    """A job's node list (`n[1,3]`) as host names in node order (SLURM_NODEID indexes it)."""
    out = slurm_command(["scontrol", "show", "hostnames", nodelist], timeout=30)
    names = out.stdout.split()
    if not names:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} named no host (exit code {out.returncode}"
                           f"{': ' + out.stderr.strip() if out.stderr.strip() else ''})")
    return names


def first_node(nodelist: str) -> str:
    return hostnames(nodelist)[0]


class NodeTask:
    """What runs on each node of the job (pickled by submitit; holds only plain values)."""

    def __init__(
        self,
        run_dir: str,
        procs_per_node: int,
        max_requeues: int,
        module: str = "hpctrain.trainers.pretrain",
        retries_on_failure: int = 0,
        max_excluded_nodes: int = 0,
        container: dict | None = None,
        rank_start: str = "auto",
    ):
        self.run_dir = run_dir
        self.rank_start = rank_start
        self.procs_per_node = procs_per_node
        self.max_requeues = max_requeues
        self.module = module
        self.retries_on_failure = retries_on_failure
        self.max_excluded_nodes = max_excluded_nodes
        self.container = container  # launcher/container.py: for_node_task
        self._proc = None
        self._signalled = False

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_proc", "_signalled")}

    def __setstate__(self, state: dict) -> None:
        # a job submitted by an older hpctrain, requeued under this one, lacks the newer fields
        self.__dict__.update({"max_excluded_nodes": 0, "container": None, "rank_start": "exec", **state, "_proc": None, "_signalled": False})

    def stop_path(self, job_id: str) -> Path:
        # one stop file per attempt: a stale request can never stop the next attempt
        return RunDir(self.run_dir).slurm_stop_file(job_id, _restart_count())

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        try:
            if env.global_rank == 0:  # written again by every attempt: a requeue may find the disk full
                keep_reserve(self.run_dir)
            return self._run(env)
        except OSError as e:  # the node task's own writes (reserve, stop file, reports, status)
            cause = disk_full_cause(e)
            if cause is None:
                raise
            self._disk_full(env, cause)
            raise

    def _disk_full(self, env, cause: OSError) -> None:
        """This node task met a full disk itself: the one line (naming the newest checkpoint),
        recorded where it fits, and the whole job ends without a requeue or a retry: cancelled,
        since the other node tasks may already wait for this one in torchrun's rendezvous."""
        free_reserve(self.run_dir)
        line = disk_full_reason(self.run_dir, cause)
        with contextlib.suppress(OSError):
            print(f"hpctrain: {line}\nhpctrain: not requeued or retried", flush=True)
        with contextlib.suppress(OSError):
            mark_failed(self.run_dir, line, disk_full=True)
        if env.global_rank == 0:
            with contextlib.suppress(OSError):
                self._release(env, env.job_id)
        slurm_command(["scancel", env.job_id], timeout=60)

    def _run(self, env) -> str:
        import submitit

        job_id = env.job_id
        stop = self.stop_path(job_id)
        nnodes, node = env.num_nodes, env.node
        master = first_node(os.environ["SLURM_JOB_NODELIST"])
        port = rendezvous_port(int(env.raw_job_id), _restart_count())
        print(
            f"hpctrain node task {node}/{nnodes} on {env.hostname} (job {job_id}, restart "
            f"{_restart_count()}), rendezvous {master}:{port}",
            flush=True,
        )

        if env.global_rank == 0:  # the job holds the run dir (submit handed it the lock; a requeue keeps it)
            lock.acquire(self.run_dir, lock.job_owner(job_id))
        submitit_handler = signal.getsignal(signal.SIGUSR2)

        def forward(signum, frame):
            self._signalled = True
            stop.parent.mkdir(parents=True, exist_ok=True)
            stop.write_text(f"{signal.Signals(signum).name} job {job_id}\n")
            print(
                f"hpctrain: {signal.Signals(signum).name}: stop requested; trainers save at the next step",
                flush=True,
            )
            if signum == signal.SIGUSR2 and callable(submitit_handler):
                submitit_handler(signum, frame)  # global rank 0: checkpoint() then requeue

        signal.signal(signal.SIGUSR2, forward)
        signal.signal(signal.SIGTERM, forward)
        from hpctrain.launcher import slurm_entry

        if slurm_entry.EARLY_SIGNALS:  # preempted while Python was still starting
            forward(signal.SIGUSR2, None)
        cmd = build_torchrun_command(
            self.run_dir,
            self.procs_per_node,
            module=self.module,
            nnodes=nnodes,
            node_rank=node,
            rdzv_endpoint=f"{master}:{port}",
            run_id=f"job{job_id}",
            deadline=job_end_time(job_id),
            stop_file=str(stop),
            log_dir=str(
                RunDir(self.run_dir).node_logs(job_id, _restart_count(), node)
            ),
            python=container.python_in(self.container) if self.container else None,
            fork_ranks=(fork := forks_ranks(self.rank_start)),
        )
        env_ = {**job_env(self.procs_per_node), **(ENV_ROOM if fork else {})}
        if self.container:  # torchrun inside it; this task stays outside (launcher/container.py)
            cmd, env_ = container.wrap(self.container, self.run_dir, cmd, env_, container.node_name())
            print(f"hpctrain: in a container: {show_command(cmd[:cmd.index('-m')])} ...", flush=True)
        tail: list[str] = []
        self._proc = start_torchrun(cmd, env=env_, stderr_tail=tail)
        try:
            while self._proc.poll() is None:
                time.sleep(0.5)
        except (
            submitit.core.utils.UncompletedJobError
        ) as e:  # raised by submitit's handler: no requeue
            _wait(self._proc)
            if env.global_rank == 0:
                mark_stopped(self.run_dir, f"not requeued: {e}")
            raise
        return self._after(env, job_id, self._proc.returncode, tail)

    def _after(self, env, job_id: str, rc: int, tail: list[str]) -> str:
        """What follows the attempt on this node (launcher/attempt.py: `after_attempt`): the job
        ends ("finished"), is requeued to resume, or ends for good (raises: the job fails)."""
        status = read_status(self.run_dir)
        outcome = attempt_outcome(rc, status)
        scope = f"slurm job {job_id}"
        if outcome is Outcome.FINISHED:
            self._release(env, job_id)
            return "finished"
        if outcome is Outcome.PREEMPTED:
            if env.global_rank == 0 and not self._signalled:
                self._requeue_after_deadline(job_id)
            return "preempted"
        if outcome in (Outcome.DISK_FULL, Outcome.USER_ERROR):  # recorded by the trainer: a requeue repeats it
            after = after_attempt(outcome, status, self.retries_on_failure, scope)
            fix = ": fix it and submit again" if outcome is Outcome.USER_ERROR else ""
            print(f"hpctrain: {after.line}\nhpctrain: not requeued or retried{fix}", flush=True)
            self._release(env, job_id)
            if outcome is Outcome.USER_ERROR:
                raise UserError(status.reason or "a user error (see the rank logs)",
                                hint=f"rank logs under {RunDir(self.run_dir).logs}")
            raise RuntimeError(status.reason)
        self._proc.stderr_copied()
        reason = failure_reason(rc, tail, env.node)
        reports = RunDir(self.run_dir).failure_reports(job_id, _restart_count())
        reports.mkdir(parents=True, exist_ok=True)
        atomic_write_text(reports / f"node{env.node}", reason + "\n")
        if env.global_rank == 0 and status.state == State.HUNG:
            self._leave_out_bad_nodes(env, job_id, status.reason or "")  # for the next submit: a hang is not retried
        if env.global_rank == 0 and status.state not in (State.FAILED, State.HUNG):  # the trainer's reason wins
            reason = root_cause(reports, env.num_nodes, reason)
            mark_failed(self.run_dir, reason)
            self._leave_out_bad_nodes(env, job_id, reason)
            after = record_after_failure(self.run_dir, read_status(self.run_dir), scope, self.retries_on_failure)
            if after.action is Action.RETRY:
                print(f"hpctrain: {after.line}: requeueing the job", flush=True)
                bad_nodes.requeue_leaving_out(job_id, self.run_dir)
                _end_after_requeue()
        self._release(env, job_id)
        raise RuntimeError(f"{reason}; rank logs under {RunDir(self.run_dir).logs}")

    def _leave_out_bad_nodes(self, env, job_id: str, reason: str) -> None:
        """The nodes `reason` blames join the run's excluded list (launcher/bad_nodes.py)."""
        nodes = bad_nodes.blamed_nodes(reason, self.procs_per_node, env.num_nodes)
        if not nodes:
            return
        hosts = hostnames(os.environ["SLURM_JOB_NODELIST"])
        blamed = [hosts[n] for n in nodes if n < len(hosts)]
        added, capped = bad_nodes.exclude(self.run_dir, blamed, reason, job_id,
                                          self.max_excluded_nodes)
        if added:
            print(f"hpctrain: leaving out node(s) {', '.join(added)} from this run's next attempts", flush=True)
        if capped:
            print(f"hpctrain: not leaving out {', '.join(capped)}: cluster.max_excluded_nodes "
                  f"({self.max_excluded_nodes}) are left out already", flush=True)

    def _release(self, env, job_id: str) -> None:
        """The job's last attempt is over: the run dir is free for the next run or submit."""
        if env.global_rank == 0:
            lock.release(self.run_dir, lock.job_owner(job_id))

    def _requeue_after_deadline(self, job_id: str) -> None:
        """The trainer stopped ahead of the time limit without a signal: requeue like submitit would."""
        if _restart_count() >= self.max_requeues:
            mark_stopped(self.run_dir, f"requeue limit ({self.max_requeues}) reached")
            raise RuntimeError(f"requeue limit ({self.max_requeues}) reached; resubmit to continue")
        if error := failure(slurm_command(["scontrol", "requeue", job_id], timeout=120)):
            raise RuntimeError(error)
        _end_after_requeue()

    def checkpoint(self):
        """submitit calls this on global rank 0 after USR2: return only once the save is done."""
        import submitit

        if self._proc is not None:
            _wait(self._proc)
            if read_status(self.run_dir).state == State.FINISHED:
                return None  # nothing left to do: no requeue
        again = NodeTask.__new__(NodeTask)
        again.__setstate__(self.__getstate__())
        return submitit.helpers.DelayedSubmission(again)


def _end_after_requeue() -> None:
    """This task requeued its own job: the attempt is over, so it exits now, as submitit does
    after the requeue of a USR2. Waiting for the requeue's kill instead held the job KillWait
    seconds (30 by default) longer: the kill's SIGTERM is the signal this task catches to stop
    the trainers, so only the SIGKILL after KillWait ended it, and a job starts again only once
    its last process is gone. Exit status -1, as submitit's: the requeue decides what follows."""
    print("hpctrain: the job is requeued; this attempt ends here", flush=True)
    sys.exit(-1)


def root_cause(reports: Path, nnodes: int, mine: str, wait_s: float = 10.0) -> str:
    """The failure to report for the job: every node task writes what its torchrun saw; a rank
    killed by a signal is the cause and the others' errors its consequence (their peers
    vanished), so a "killed by" report wins, else node 0's own. A rank that aborted itself
    (SIGABRT: the communication library's reaction to a vanished peer) is a consequence too
    when another rank was killed from outside."""
    end = time.time() + wait_s
    while len(list(reports.iterdir())) < nnodes and time.time() < end:
        time.sleep(0.2)
    seen = [p.read_text().strip() for p in sorted(reports.iterdir())]
    killed = [r for r in seen if "killed by" in r]
    return next((r for r in killed if "SIGABRT" not in r), killed[0] if killed else mine)


def _wait(proc) -> None:
    # poll, never Popen.wait(): the main thread may hold Popen's wait lock when a signal lands
    while proc.poll() is None:
        time.sleep(0.2)


def job_env(nproc: int) -> dict:
    """Environment of torchrun on a node: threads from the CPUs Slurm gave this node."""
    from hpctrain.launcher.local import torch_env

    cpus = len(os.sched_getaffinity(0))  # what Slurm bound this task to (all CPUs when unbound)
    env = torch_env(nproc)
    # a rank's slice of them, unless the user set a count (cluster.env, or the submitting shell)
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(max(1, cpus // nproc))
    env["HPCTRAIN_RANK_CPUS"] = "split"  # each rank takes its own slice (trainers/distributed.py)
    return env


def submit(spec: RunSpec, run_dir: Path, dependency: str | None = None) -> str:
    """Submit one run; returns the Slurm job id and records it in RUN_DIR/slurm/jobs.json."""
    ex = make_executor(spec, run_dir, dependency)
    task = NodeTask(str(run_dir), spec.cluster.procs_per_node, spec.cluster.max_requeues, spec.trainer_module,
                    spec.cluster.retries_on_failure, spec.cluster.max_excluded_nodes, container.for_node_task(spec),
                    spec.cluster.rank_start)
    try:
        job = ex.submit(task)
    except Exception as e:  # sbatch said no: a user-facing problem (partition, account, limits)
        raise UserError(f"sbatch refused the job: {e}", field="cluster") from None
    jobs_file = RunDir(run_dir).jobs_file
    jobs = json.loads(jobs_file.read_text()) if jobs_file.is_file() else []
    jobs.append({"job_id": job.job_id, "submitted_at": time.time(), "dependency": dependency})
    atomic_write_text(jobs_file, json.dumps(jobs, indent=2))
    return job.job_id


def dry_run(spec: RunSpec, run_dir: Path) -> str:
    ex = make_executor(spec, run_dir)
    box = container.for_node_task(spec)
    cmd = build_torchrun_command(
        str(run_dir),
        spec.cluster.procs_per_node,
        module=spec.trainer_module,
        nnodes=spec.cluster.nodes,
        node_rank=0,
        rdzv_endpoint="FIRST_NODE:PORT",
        run_id="jobJOBID",
        stop_file=str(RunDir(run_dir).slurm_stop_file("JOBID", "N")),
        python=container.python_in(box) if box else sys.executable,
        # `auto` is decided on the node; a job that asks for no GPU has its ranks forked there
        fork_ranks=spec.cluster.rank_start == "fork"
        or (spec.cluster.rank_start == "auto" and spec.cluster.gpus_per_node == 0),
    )
    inside = ""
    if box:
        from hpctrain.launcher.local import torch_env

        env = {**torch_env(spec.cluster.procs_per_node), "HPCTRAIN_RANK_CPUS": "split", **spec.cluster.env}
        names = container.passed_names(box, env)
        cmd, env = container.wrap(box, str(run_dir), cmd, env, "NODE")
        inside = (f" inside the container ({box['spec']['runtime']}; NODE is the node's Slurm name; the "
                  f"environment passed in, values never on the command line: {', '.join(names)})")
    return (
        f"# sbatch script (submitit writes it to {run_dir / 'slurm'})\n{sbatch_script(ex)}\n"
        f"# each node task then runs{inside} (node rank, first node and port come from Slurm):\n"
        f"{show_command(cmd)}\n"
    )


def jobs_of(run_dir: Path) -> list[dict]:
    f = RunDir(run_dir).jobs_file
    return json.loads(f.read_text()) if f.is_file() else []


def slurm_state(job_id: str) -> dict:
    """State, reason, restarts and nodes of a job from scontrol (no sacct without slurmdbd)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        )
    except OSError:
        return {}
    if out.returncode != 0:
        return {}
    fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
    return {
        "state": fields.get("JobState"),
        "reason": fields.get("Reason"),
        "restarts": fields.get("Restarts"),
        "nodes": fields.get("NodeList"),
        "run_time": fields.get("RunTime"),
        "exit_code": fields.get("ExitCode"),
    }
