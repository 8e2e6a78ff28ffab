"""`hpctrain submit` on the real two-node local Slurm cluster."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hpctrain.launcher.slurm import hostnames
from tests.conftest import fill_disk, run_cli
from tests.slurm.helpers import (
    completed_after_one_requeue,
    job_id,
    metrics_step,
    preempt,
    preempt_while_training,
    preempted_run,
    restart_count,
    sharded_preempted_once_resumes_bitwise,
    slurm_spec,
    state,
    submit,
    trainer_processes,
    wait_state,
)
from tests.trainers.helpers import losses, trainer_pids, wait_for, write_spec

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def test_two_node_job_trains_and_exports(tmp_path, bpe_tokenizer, bpe_corpus):
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", slurm_spec(run, bpe_tokenizer, bpe_corpus, steps=20))
    r = submit(spec)
    job = job_id(run)
    assert f"submitted job {job}" in r.stdout
    st = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    assert st["state"] == "COMPLETED", st
    assert st["nodes"] == "n[1-2]"
    assert (run / "export" / "model.safetensors").is_file()
    rank_lines = "\n".join(p.read_text() for p in (run / "logs").rglob("stderr.log"))
    assert "rank 0/2 on node" in rank_lines and "rank 1/2 on node" in rank_lines
    assert "on node 0" in rank_lines and "on node 1" in rank_lines
    status = run_cli("status", str(run))
    assert "COMPLETED" in status.stdout and "finished at step 20/20" in status.stdout


def test_preemption_requeues_the_same_job_and_resumes_bitwise(tmp_path, bpe_tokenizer, bpe_corpus, local_reference):
    run, job = preempted_run(tmp_path, bpe_tokenizer, bpe_corpus, preemptions=1)
    st = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert st["state"] == "COMPLETED" and st["restarts"] == "1"
    log = "\n".join(p.read_text() for p in (run / "slurm").glob(f"{job}_0_log.*"))
    assert "preempted" in log or "stop requested" in log
    got = losses(run)
    assert sorted(got) == list(range(1, 61))
    assert got == local_reference  # every step, before and after the resume: bitwise
    assert trainer_processes(run) == []


def test_two_preemptions_in_a_row(tmp_path, bpe_tokenizer, bpe_corpus, local_reference):
    run, job = preempted_run(tmp_path, bpe_tokenizer, bpe_corpus, preemptions=2)
    st = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert st["state"] == "COMPLETED" and st["restarts"] == "2"
    assert losses(run) == local_reference


def test_fsdp_preempted_on_two_nodes_resumes_bitwise(tmp_path, bpe_tokenizer, bpe_corpus):
    """FSDP2 over 2 nodes x 1 rank: every rank writes its DCP shards on USR2, the requeued job
    finishes with the losses of an uninterrupted local 2-rank fsdp run."""
    sharded_preempted_once_resumes_bitwise(tmp_path, bpe_tokenizer, bpe_corpus, {"type": "fsdp"}, "dcp")


def test_preemption_during_the_first_minute(tmp_path, bpe_tokenizer, bpe_corpus, local_reference):
    """USR2 as soon as the job runs, before the trainers have taken a step."""
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", slurm_spec(run, bpe_tokenizer, bpe_corpus, steps=60))
    submit(spec)
    job = job_id(run)
    wait_state(job, ("RUNNING",))
    # the node task runs (a signal before any task process exists is dropped by Slurm itself)
    wait_for(lambda: any("hpctrain node task 0/2" in p.read_text() for p in (run / "slurm").glob(f"{job}_0_log.out")),
             what="the node task to start")
    assert not (run / "metrics.jsonl").exists()  # no training step yet
    preempt(job)
    wait_for(lambda: restart_count(job) >= 1, timeout=180, what="the requeue")
    st = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert st["state"] == "COMPLETED", st
    assert losses(run) == local_reference


def test_requeue_limit_ends_the_job_with_a_clear_status(tmp_path, bpe_tokenizer, bpe_corpus):
    # time limits under 10 minutes make submitit count every signal as a time-out
    run, job = preempted_run(tmp_path, bpe_tokenizer, bpe_corpus, preemptions=1, max_requeues=1)
    preempt_while_training(run, job, attempt=1, min_step=20)
    st = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"), eligible=False)
    assert st["state"] == "FAILED" and st["restarts"] == "1"
    status = run_cli("status", str(run)).stdout
    assert "not requeued" in status and "timed-out too many times" in status
    assert "newest checkpoint" in status and "none" not in status.split("newest checkpoint:")[1]


def test_hostile_values_are_quoted_and_secrets_stay_out_of_files(tmp_path, bpe_tokenizer, bpe_corpus):
    owned = tmp_path / "owned"
    run = tmp_path / "run"
    spec = slurm_spec(run, bpe_tokenizer, bpe_corpus, steps=4,
                      job_name=f'x"; touch {owned}; "', setup=["echo 'setup ran' >&2"],
                      env={"HPCTRAIN_TEST_VALUE": f"a b'; touch {owned}"})
    spec_path = write_spec(tmp_path / "s.yaml", spec)
    dry = run_cli("submit", str(spec_path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"""#SBATCH --job-name='x"; touch {owned}; "'""" in dry.stdout
    assert "export HPCTRAIN_TEST_VALUE='a b'\"'\"'; touch" in dry.stdout
    assert not run.exists()  # a dry run writes nothing
    secret = "wandb-secret-0123456789abcdef"
    submit(spec_path, env={"WANDB_API_KEY": secret})
    job = job_id(run)
    st = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert st["state"] == "COMPLETED", st
    assert not owned.exists()
    for f in run.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_secrets_in_the_spec_env_are_refused(tmp_path, bpe_tokenizer, bpe_corpus):
    spec = slurm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus, env={"WANDB_API_KEY": "x"})
    r = run_cli("submit", str(write_spec(tmp_path / "s.yaml", spec)), "--dry-run")
    assert r.returncode == 2 and "cluster.env" in r.stderr and "secret" in r.stderr
    spec = slurm_spec(tmp_path / "run", bpe_tokenizer, bpe_corpus, partition="a\n#SBATCH --x")
    r = run_cli("submit", str(write_spec(tmp_path / "s.yaml", spec)), "--dry-run")
    assert r.returncode == 2 and "one line" in r.stderr


def test_pipeline_stages_are_chained_with_afterok(tmp_path, bpe_tokenizer, bpe_corpus):
    import yaml

    from tests.trainers.helpers import TINY_LLAMA

    root = tmp_path / "pipe"
    cluster = {"executor": "slurm", "nodes": 1, "procs_per_node": 1, "time_min": 10}
    data = {
        "name": "pipe",
        "run_dir": str(root),
        "defaults": {
            "data": {"corpora": [{"path": bpe_corpus}], "seq_len": 32},
            "training": {"global_batch": 8, "micro_batch": 4, "steps": 8, "lr": 2e-3},
            "cluster": cluster,
        },
        "stages": [
            {"name": "pretrain", "model": {"config": TINY_LLAMA, "tokenizer": bpe_tokenizer}},
            {"name": "more", "model": {"path": "stage:pretrain"}, "training": {"steps": 4}},
        ],
    }
    spec = tmp_path / "pipe.yaml"
    spec.write_text(yaml.safe_dump(data))
    r = submit(spec)
    first, second = job_id(root / "pretrain"), job_id(root / "more")
    assert f"after job {first}" in r.stdout
    dep = subprocess.run(["scontrol", "show", "job", second], capture_output=True, text=True).stdout
    assert f"afterok:{first}" in dep
    assert wait_state(second, ("COMPLETED", "FAILED", "CANCELLED"))["state"] == "COMPLETED"
    assert wait_state(first, ("COMPLETED",))["state"] == "COMPLETED"
    # the second stage started only after the first one's export existed, and used it
    export_done = (root / "pretrain" / "export" / "model.safetensors").stat().st_mtime
    first_step = json.loads((root / "more" / "metrics.jsonl").read_text().splitlines()[0])["time"]
    assert export_done < first_step
    assert yaml.safe_load((root / "more" / "spec.yaml").read_text())["model"]["path"] == str(root / "pretrain" / "export")


def test_a_killed_rank_is_retried_through_a_requeue(tmp_path, bpe_tokenizer, bpe_corpus, local_reference):
    """cluster.retries_on_failure: 1 on Slurm: a trainer rank killed (an OOM kill, a lost GPU) fails
    the attempt; the node task records why, leaves that rank's node out and requeues the job,
    which runs on the two other nodes and finishes bitwise; `status` shows the node left out and
    a later submit of the run dir excludes it."""
    import os
    import signal

    def rank_1() -> int:  # the worker process with RANK=1 (torchrun's own has no RANK)
        for pid in trainer_processes(run):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if b"RANK=1" in env:
                return pid
        raise AssertionError("no rank 1 process")

    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", slurm_spec(run, bpe_tokenizer, bpe_corpus, steps=60,
                                                      retries_on_failure=1))
    submit(spec)
    job = job_id(run)
    wait_state(job, ("RUNNING",))
    from tests.slurm.helpers import wait_step

    wait_step(run, 12)
    first_nodes = hostnames(state(job)["nodes"])
    os.kill(rank_1(), signal.SIGKILL)
    completed_after_one_requeue(job, what="the retry's requeue")
    status = json.loads((run / "status.json").read_text())
    assert [r["reason"] for r in status["retries"]] == ["rank 1 killed by SIGKILL on node 1"], status
    assert losses(run) == local_reference
    assert trainer_processes(run) == []
    # the node task that requeued ended by itself, not by the requeue's SIGKILL KillWait later
    first_log = (run / "slurm" / f"{job}_0_log.out").read_text()
    assert "the job is requeued; this attempt ends here" in first_log, first_log

    bad = first_nodes[1]  # node 1 of the first attempt held rank 1
    assert bad not in hostnames(state(job)["nodes"]) and len(hostnames(state(job)["nodes"])) == 2
    shown = run_cli("status", str(run)).stdout
    assert "excluded nodes" in shown and f"{bad}: job {job}, rank 1 killed by SIGKILL on node 1" in shown, shown
    dry = run_cli("submit", str(spec), "--dry-run")
    assert dry.returncode == 0 and f"#SBATCH --exclude={bad}" in dry.stdout, dry.stdout + dry.stderr


def test_the_requeue_leaves_the_node_out_when_its_own_kill_lands_during_the_update(tmp_path):
    """The retry's requeue (requeuehold, update ExcNodeList, release) kills the job's steps, and
    Slurm's SIGTERM reaches every process of the step: here it lands while `scontrol update`
    runs (an `scontrol` ahead on PATH waits 3 s before the update, as a loaded controller may),
    and the update still takes effect: the next attempt runs without the excluded node."""
    import shutil
    import sys
    import textwrap

    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text("name: x\n")
    wrap = tmp_path / "bin"
    wrap.mkdir()
    (wrap / "scontrol").write_text(f'#!/bin/bash\n[ "$1" = update ] && sleep 3\nexec {shutil.which("scontrol")} "$@"\n')
    (wrap / "scontrol").chmod(0o755)
    node_task = textwrap.dedent("""
        import os, signal, sys
        from hpctrain.launcher import bad_nodes
        from hpctrain.launcher.slurm import hostnames
        signal.signal(signal.SIGTERM, lambda *a: None)  # the node task takes TERM as a stop request
        job, run = os.environ["SLURM_JOB_ID"], sys.argv[1]
        bad_nodes.exclude(run, [hostnames(os.environ["SLURM_JOB_NODELIST"])[1]], "test", job, cap=2)
        bad_nodes.requeue_leaving_out(job, run)
    """)
    (tmp_path / "node_task.py").write_text(node_task)
    (tmp_path / "job.sh").write_text(
        "#!/bin/bash\n#SBATCH --nodes=2 --requeue --output=/dev/null\n"
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then\n'
        f'  echo "$SLURM_JOB_NODELIST" > {run}/first_nodes\n'
        f'  PATH={wrap}:$PATH exec {sys.executable} {tmp_path}/node_task.py {run}\nfi\n'
        f'echo "$SLURM_JOB_NODELIST" > {run}/second_nodes\n')
    job = subprocess.run(["sbatch", "--parsable", str(tmp_path / "job.sh")], capture_output=True, text=True,
                         check=True).stdout.strip()
    completed_after_one_requeue(job)
    bad = hostnames((run / "first_nodes").read_text().strip())[1]
    second = hostnames((run / "second_nodes").read_text().strip())
    assert bad not in second and len(second) == 2, (bad, second)


def test_a_user_error_found_after_the_queue_is_reported_and_never_retried(tmp_path, bpe_tokenizer, bpe_corpus):
    """The corpus is cut after `submit` validated it (a copy to scratch still running): the
    trainer's start-up refuses it; the job ends with that one line, not requeued or retried."""
    import os
    import shutil

    corpus = Path(shutil.copytree(bpe_corpus, tmp_path / "corpus"))
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", slurm_spec(run, bpe_tokenizer, str(corpus), steps=10,
                                                      retries_on_failure=1))
    submit(spec)
    shard = corpus / "train-00000.bin"
    os.truncate(shard, shard.stat().st_size // 2)
    job = job_id(run)
    st = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"), eligible=False)
    assert st["state"] == "FAILED" and st["restarts"] == "0", st
    log = "\n".join(p.read_text() for p in (run / "slurm").glob(f"{job}_0_log.*"))
    assert f"hpctrain: error: {shard}" in log and "truncated" in log, log
    assert "torchrun exited with code" not in log and "retry 1 of 1" not in log, log
    status = json.loads((run / "status.json").read_text())
    assert status["user_error"] and "retries" not in status, status
    shown = run_cli("status", str(run)).stdout
    assert "trainer: failed" in shown and "truncated" in shown, shown


def test_each_rank_of_a_node_task_runs_on_its_own_cpus(tmp_path, bpe_tokenizer, bpe_corpus):
    """The local cluster binds tasks (task/affinity, 2 CPUs a node): the node task asks for a CPU
    per rank, and each of its 2 ranks - every thread of it - runs on a CPU of its own."""
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "s.yaml", slurm_spec(run, bpe_tokenizer, bpe_corpus, steps=300, nodes=1,
                                                      procs_per_node=2, cpus_per_task=None, env={}))
    submit(spec)
    job = job_id(run)
    wait_state(job, ("RUNNING",))
    wait_for(lambda: metrics_step(run) >= 3, timeout=180, what="step 3")
    allowed = {}
    for pid in trainer_pids(run):  # the ranks (not torchrun, which keeps the task's CPUs)
        tasks = Path(f"/proc/{pid}/task")
        masks = {(t / "status").read_text().split("Cpus_allowed_list:")[1].split()[0] for t in tasks.iterdir()}
        allowed[pid] = masks
    run_cli("cancel", str(run))
    assert len(allowed) == 2, allowed
    assert all(len(m) == 1 for m in allowed.values()), allowed  # every thread of a rank: one mask
    assert sorted(next(iter(m)) for m in allowed.values()) == ["0", "1"], allowed
    logs = "\n".join(p.read_text() for p in (run / "logs").rglob("stderr.log"))
    assert "local rank 0 of 2 runs on CPUs [0]" in logs and "local rank 1 of 2 runs on CPUs [1]" in logs


def test_a_requeued_job_that_finds_the_disk_full_says_so_once_and_waits_for_space(
        tmp_path, small_disk, bpe_tokenizer, bpe_corpus, local_reference):
    """Preempted and requeued; while it waits in the queue the run dir's file system fills up to
    the last byte (the reserve the first attempt wrote is all that is left). The requeued job
    meets it at once: one line in the job's log naming the newest checkpoint, and the job ends
    (cancelled by the node task that met it: its peers may wait for it) without another requeue
    or a retry. Once space is freed, the same submit resumes from that checkpoint: every loss as
    if never stopped."""
    run = small_disk / "run"
    spec = write_spec(tmp_path / "s.yaml", slurm_spec(run, bpe_tokenizer, bpe_corpus, steps=60,
                                                      retries_on_failure=1))
    submit(spec)
    job = job_id(run)
    preempt_while_training(run, job, attempt=0, min_step=5)
    wait_for(lambda: restart_count(job) >= 1, timeout=180, what="the requeue")
    wait_state(job, ("PENDING",), eligible=False)
    saved = json.loads((run / "status.json").read_text())["step"]
    fill_disk(small_disk / "filler", leave=0)
    st = wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"))
    assert st["state"] in ("FAILED", "CANCELLED") and st["restarts"] == "1", st
    log = "\n".join(p.read_text() for p in (run / "slurm").glob(f"{job}_*_log.out"))
    lines = [x for x in log.splitlines() if "disk full" in x]
    assert lines and all(f"newest complete checkpoint is step {saved}" in x for x in lines), log
    assert "not requeued or retried" in log and "retry 1 of 1" not in log, log
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["disk_full"] and "retries" not in status, status

    (small_disk / "filler").unlink()
    submit(spec)
    again = job_id(run)
    assert wait_state(again, ("COMPLETED", "FAILED", "CANCELLED"))["state"] == "COMPLETED"
    assert losses(run) == local_reference


def test_dpo_preempted_during_its_reference_pass_resumes_the_pass_and_trains_bitwise(tmp_path, tiny_llama):
    """Full DPO on 2 nodes x 1 rank, USR2 while the reference pass is under way (each part made
    slow): the job is requeued, the next attempt computes only the parts still missing, and the
    run finishes with the losses of an uninterrupted local 2-rank run."""
    from tests.trainers.test_dpo import dpo_spec

    one_thread = {"OMP_NUM_THREADS": "1"}
    ref = dpo_spec(tmp_path / "ref", tiny_llama)
    ref["cluster"] = {"procs_per_node": 2, "env": one_thread}
    r = run_cli("run", str(write_spec(tmp_path / "ref.yaml", ref)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "run"
    spec = dpo_spec(run, tiny_llama)
    spec["cluster"] = {"executor": "slurm", "nodes": 2, "procs_per_node": 1, "time_min": 10, "max_requeues": 3,
                       "cpus_per_task": 2, "env": {**one_thread, "HPCTRAIN_FAULT_SLOW_REFERENCE_PART_S": "2"}}
    submit(write_spec(tmp_path / "s.yaml", spec))
    job = job_id(run)
    parts = run / "reference" / "train"
    wait_for(lambda: len(list(parts.glob("*.json"))) >= 1, timeout=300, what="a stored part")
    preempt(job)
    completed_after_one_requeue(job)
    log = "\n".join(p.read_text() for p in (run / "slurm").glob(f"{job}_0_log.*"))
    assert "reference pass of train stopped" in log and "resumable" in log, log[-3000:]
    assert "reference log-probs of train (160 pairs): 0 stored" in log
    assert "reference log-probs of train (160 pairs): 32 stored" in log or \
        "reference log-probs of train (160 pairs): 64 stored" in log, log[-3000:]
    assert losses(run) == losses(tmp_path / "ref")


def test_a_preempted_grpo_run_is_requeued_and_samples_the_same_completions(tmp_path, tiny_llama):
    """Full GRPO with a KL penalty on 2 nodes x 1 rank, USR2 once while it trains: the job is
    requeued and every step's loss, reward and KL, before and after, are an uninterrupted local
    2-rank run's (the completions after the resume are sampled again, the same)."""
    from tests.trainers.test_grpo import grpo_spec, records

    one_thread = {"OMP_NUM_THREADS": "1"}
    ref = grpo_spec(tmp_path / "ref", tiny_llama, kl_coef=0.05)
    ref["training"].update(steps=10, eval_every=None)
    ref["cluster"] = {"procs_per_node": 2, "env": one_thread}
    r = run_cli("run", str(write_spec(tmp_path / "ref.yaml", ref)), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "run"
    spec = {**ref, "run_dir": str(run), "cluster": {"executor": "slurm", "nodes": 2, "procs_per_node": 1,
                                                    "time_min": 10, "max_requeues": 3, "cpus_per_task": 2,
                                                    "env": one_thread}}
    submit(write_spec(tmp_path / "s.yaml", spec))
    job = job_id(run)
    preempt_while_training(run, job, attempt=0, min_step=3)
    completed_after_one_requeue(job)
    log = "\n".join(p.read_text() for p in (run / "slurm").glob(f"{job}_0_log.*"))
    assert "resuming from" in log, log[-3000:]
    seen = lambda d: {x["step"]: (x["loss"], x["reward"], x["kl"]) for x in records(d) if "reward" in x}  # noqa: E731
    want = seen(tmp_path / "ref")
    assert sorted(want) == list(range(1, 11)) and seen(run) == want
