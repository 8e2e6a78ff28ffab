"""Where specs are written (a laptop: no Slurm) and options out of range: one line, exit 2,
nothing written; the dry run still shows the job."""

from __future__ import annotations

from tests.conftest import REPO, run_cli
from tests.trainers.helpers import clm_spec, write_spec


def _slurm_spec(tmp_path, tok, corpus):
    spec = clm_spec(tmp_path / "run", tok, corpus)
    spec["cluster"].update({"executor": "slurm", "nodes": 2, "time_min": 30})
    return write_spec(tmp_path / "s.yaml", spec)


def test_dry_run_and_submit_on_a_machine_without_slurm(tmp_path, bpe_tokenizer, bpe_corpus):
    no_slurm = {"PATH": str(tmp_path / "empty-bin")}  # no sbatch, no srun
    spec = _slurm_spec(tmp_path, bpe_tokenizer, bpe_corpus)
    dry = run_cli("submit", str(spec), "--dry-run", env=no_slurm)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "#SBATCH --nodes=2" in dry.stdout and "srun --unbuffered" in dry.stdout
    assert "-m torch.distributed.run --nnodes=2" in dry.stdout and "Traceback" not in dry.stderr
    r = run_cli("submit", str(spec), env=no_slurm)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(f"hpctrain: error: {spec}: cluster.executor: no Slurm on this machine (sbatch and srun not found")
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 2, r.stderr
    assert not (tmp_path / "run").exists()


def test_options_out_of_range_are_refused(tmp_path, bpe_tokenizer, bpe_corpus):
    spec = _slurm_spec(tmp_path, bpe_tokenizer, bpe_corpus)
    for args, option in ((("sweep", str(spec), "--over", "training.lr=0.1,0.2", "--max-parallel", "0"), "--max-parallel"),
                         (("plan", str(REPO / "examples" / "pretrain_tiny_llama_zero3.yaml"), "--gpu-mem", "-8"),
                          "--gpu-mem")):
        r = run_cli(*args)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"argument {option}: expected" in r.stderr and "Traceback" not in r.stderr
        assert r.stdout == ""
    assert not (tmp_path / "run").exists()
