"""`make demo` and `make test` install TensorFlow's CUDA build where an NVIDIA driver answers and
the CPU build elsewhere: the Makefile's choice, read from `make -n` (nothing run) with a fake
`nvidia-smi` first on the PATH, whatever this machine has."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def planned_install(tmp_path: Path, nvidia_smi_exit: int) -> str:
    """The commands `make -n -B demo` would run, with an `nvidia-smi` that lists one GPU and
    exits 0, or fails as it does without a driver (exit 9)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        + (
            "echo 'GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)'\n"
            if nvidia_smi_exit == 0
            else (
                "echo \"NVIDIA-SMI has failed because it couldn't communicate "
                'with the NVIDIA driver."\n'
            )
        )
        + f"exit {nvidia_smi_exit}\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    planned = subprocess.run(
        ["make", "-n", "-B", "-C", str(ROOT), "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert planned.returncode == 0, planned.stderr
    return planned.stdout


@pytest.mark.parametrize(
    "exit_code, extras, stamp", [(0, "test,jpeg,gpu", "gpu"), (9, "test,jpeg", "cpu")]
)
def test_the_makefile_installs_the_cuda_build_only_where_the_driver_answers(
    tmp_path, exit_code, extras, stamp
):
    planned = planned_install(tmp_path, exit_code)
    installs = re.findall(r"pip install --quiet -c requirements\.lock -e '\.\[([^\]]*)\]'", planned)
    assert installs == [extras], planned
    assert f"touch .venv/.installed-{stamp}" in planned
    assert "cxr run --config configs/demo.yaml" in planned


def test_the_gpu_extra_is_pinned_in_the_lock():
    """Every package TensorFlow's `and-cuda` extra asks for has one exact version in the lock."""
    from importlib.metadata import requires

    cuda = {
        re.split(r"[<>=;\s]", r, maxsplit=1)[0]
        for r in requires("tensorflow")
        if 'extra == "and-cuda"' in r
    }
    pinned = {
        line.split("==")[0]
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line
    }
    assert cuda and cuda <= pinned, sorted(cuda - pinned)
    assert 'gpu = ["tensorflow[and-cuda]' in (ROOT / "pyproject.toml").read_text()
