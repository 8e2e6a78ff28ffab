"""`training.kernels`: Liger-Kernel on CUDA where asked and possible, PyTorch's kernels otherwise."""

from __future__ import annotations

import pytest

from hpctrain.launcher.contract.errors import UserError
from hpctrain.trainers.kernels import kernel_choice
from tests.conftest import run_cli
from tests.trainers.helpers import clm_spec, losses, write_spec


@pytest.mark.parametrize(("want", "device", "have", "choice", "note"), [
    ("torch", "cuda", True, "torch", None),
    ("auto", "cpu", False, "torch", None),
    ("auto", "cpu", True, "torch", None),  # Triton only: never on a CPU
    ("liger", "cpu", False, "torch", "liger runs on CUDA only"),
    ("auto", "cuda", False, "torch", None),
    ("auto", "cuda", True, "liger", None),
    ("liger", "cuda", True, "liger", None),
])
def test_the_kernel_choice(want, device, have, choice, note):
    got, said = kernel_choice(want, device, have)
    assert got == choice
    assert (said is None) if note is None else (note in said)


def test_liger_asked_on_cuda_without_the_package_names_the_extra():
    with pytest.raises(UserError, match="liger-kernel is not installed") as e:
        kernel_choice("liger", "cuda", False)
    assert e.value.field == "training.kernels" and "hpctrain[gpu]" in e.value.expected


@pytest.mark.multiproc
def test_liger_asked_on_a_cpu_trains_todays_path_bitwise_and_says_so(tmp_path, bpe_tokenizer, bpe_corpus):
    out = {}
    for kernels in ("torch", "liger"):
        spec = clm_spec(tmp_path / kernels, bpe_tokenizer, bpe_corpus, training__steps=6, training__kernels=kernels,
                        cluster__procs_per_node=1)
        r = run_cli("run", str(write_spec(tmp_path / f"{kernels}.yaml", spec)), timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        out[kernels] = (losses(tmp_path / kernels), r.stdout)
    assert out["liger"][0] == out["torch"][0] and len(out["torch"][0]) == 6
    assert "training.kernels: liger runs on CUDA only (Triton); this run is on cpu: PyTorch's kernels" in out["liger"][1]
    assert "kernels" not in out["torch"][1]
