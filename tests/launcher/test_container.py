"""cluster.container: the runtime lines a node task runs (shown by `submit --dry-run`), what
enters the container's environment, and the mistakes refused before anything is queued (the
preemption inside a container runs on the local cluster: tests/slurm/test_cgroup.py)."""

from __future__ import annotations

from hpctrain.launcher import container
from hpctrain.launcher.contract.spec import spec_from_dict
from tests.conftest import run_cli
from tests.trainers.helpers import clm_spec, write_spec

SECRET = "s3cr3t-not-on-any-command-line"


def _spec(tmp_path, tok="tok", corpus="corpus", **box) -> dict:
    s = clm_spec(tmp_path / "run", tok, corpus)
    s["training"].update(global_batch=16, micro_batch=2)
    s["cluster"] = {"executor": "slurm", "nodes": 2, "procs_per_node": 4, "gpus_per_node": 4,
                    "env": {"MY_SETTING": "1"}, "container": box}
    return s


def test_the_runtime_lines_pass_names_never_values_and_keep_the_host_environment_out(tmp_path):
    env = {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/host/lib", "PYTHONPATH": "/host/py", "WANDB_API_KEY": SECRET,
           "HF_HOME": "/hf", "OMP_NUM_THREADS": "4", "MY_SETTING": "1", "EXTRA": "x", "UNRELATED": "y"}
    tp = spec_from_dict(_spec(tmp_path, runtime="apptainer", image="/img/torch.sif", mounts=["/data:/data:ro"],
                              env=["EXTRA"]), "s.yaml")
    box = container.for_node_task(tp)
    cmd = ["python", "-m", "torch.distributed.run", "-m", "hpctrain.trainers.pretrain"]
    argv, out = container.wrap(box, "/runs/r", cmd, env, "n7")
    assert argv[:7] == ["apptainer", "exec", "--cleanenv", "--nv", "--bind", "/runs/r:/runs/r,/data:/data:ro",
                        "/img/torch.sif"] and argv[7:] == cmd
    passed = {k[len("APPTAINERENV_"):]: v for k, v in out.items() if k.startswith("APPTAINERENV_")}
    assert passed == {"WANDB_API_KEY": SECRET, "HF_HOME": "/hf", "OMP_NUM_THREADS": "4", "MY_SETTING": "1",
                      "EXTRA": "x"}  # cluster.env and container.env by name; LD_LIBRARY_PATH, PYTHONPATH stay out
    assert not any(SECRET in a for a in argv)

    pyxis = container.for_node_task(spec_from_dict(_spec(tmp_path, runtime="pyxis", image="nvcr.io#nvidia/pytorch:24.05-py3",
                                                         workdir="/workspace"), "s.yaml"))
    argv, out = container.wrap(pyxis, "/runs/r", cmd, env, "n7")
    assert argv[:8] == ["srun", "--overlap", "--nodes=1", "--ntasks=1", "--nodelist=n7",
                        "--container-image=nvcr.io#nvidia/pytorch:24.05-py3", "--container-mounts=/runs/r:/runs/r",
                        "--container-workdir=/workspace"]
    assert argv[8] == "--export=HF_HOME,MY_SETTING,OMP_NUM_THREADS,WANDB_API_KEY" and out == env

    bwrap = container.for_node_task(spec_from_dict(_spec(tmp_path, runtime="bubblewrap"), "s.yaml"))
    argv, out = container.wrap(bwrap, "/runs/r", cmd, env, "n7")
    assert argv[:8] == ["bwrap", "--dev-bind", "/", "/", "--unshare-pid", "--proc", "/proc", "--die-with-parent"]
    assert "LD_LIBRARY_PATH" not in out and out["PATH"] == "/usr/bin" and out["WANDB_API_KEY"] == SECRET


def test_dry_run_shows_the_exact_lines(tmp_path, bpe_tokenizer, bpe_corpus):
    data = tmp_path / "data"
    data.mkdir()
    image = tmp_path / "torch.sif"
    image.write_bytes(b"SIF")
    for box, line in [
        ({"runtime": "pyxis", "image": "nvcr.io#nvidia/pytorch:24.05-py3", "mounts": [f"{data}:/data:ro"]},
         f"srun --overlap --nodes=1 --ntasks=1 --nodelist=NODE '--container-image=nvcr.io#nvidia/pytorch:24.05-py3' "
         f"--container-mounts={tmp_path}/run:{tmp_path}/run,{data}:/data:ro --export="),
        ({"runtime": "apptainer", "image": str(image), "mounts": [f"{data}:/data"], "workdir": "/data"},
         f"apptainer exec --cleanenv --nv --bind {tmp_path}/run:{tmp_path}/run,{data}:/data --pwd /data {image} "
         "python -m torch.distributed.run --nnodes=2"),
    ]:
        path = write_spec(tmp_path / "s.yaml", _spec(tmp_path, bpe_tokenizer, bpe_corpus, **box))
        dry = run_cli("submit", str(path), "--dry-run", env={"WANDB_API_KEY": SECRET})
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert line in dry.stdout, dry.stdout
        assert "inside the container" in dry.stdout and "WANDB_API_KEY" in dry.stdout and SECRET not in dry.stdout
        # the corpus is under no mount at its own path: the trainers would not find it inside
        assert f"warning: data.corpora.path {bpe_corpus} is under no mount" in dry.stderr, dry.stderr


def test_container_mistakes_exit_2_before_anything_is_queued(tmp_path, bpe_tokenizer, bpe_corpus):
    def refused(cmd: str, box: dict, **cluster) -> str:
        raw = _spec(tmp_path, bpe_tokenizer, bpe_corpus, **box)
        raw["cluster"].update(cluster)
        r = run_cli(cmd, str(write_spec(tmp_path / "s.yaml", raw)), *(["--dry-run"] if cmd == "submit" else []))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert not (tmp_path / "run").exists()
        return r.stderr

    err = refused("submit", {"runtime": "apptainer", "image": str(tmp_path / "missing.sif"),
                             "mounts": [f"{tmp_path / 'nodata'}:/data"]})
    assert "cluster.container.image: the image" in err and "missing.sif does not exist" in err
    assert f"cluster.container.mounts: {tmp_path / 'nodata'}:/data: the host side" in err
    assert "cluster.container.mounts" in refused("submit", {"runtime": "pyxis", "image": "x", "mounts": ["/a:rel"]})
    assert "give no image" in refused("submit", {"runtime": "bubblewrap", "image": "x"})
    err = refused("run", {"runtime": "bubblewrap"})  # a Slurm spec run on this machine
    assert "cluster.container: a container (bubblewrap) is for Slurm jobs" in err
    err = refused("run", {"runtime": "bubblewrap"}, executor="local")
    assert "cluster.container" in err and "a container is for Slurm jobs" in err
