"""The real thing, on a machine with an NVIDIA GPU: real nvidia-smi behind a real sshd box.

Runs only with REMOTEDL_REAL_GPU=1 where nvidia-smi works (CI has no GPU: these are reported
as skipped there, never as passed). The box is the sandbox with no stand-in nvidia-smi, so
its PATH finds the machine's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from remotedl import gpus as gpumod
from remotedl import sandbox
from tests.conftest import Box, cli_for, make_env, retry_until

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        os.environ.get("REMOTEDL_REAL_GPU") != "1" or not shutil.which("nvidia-smi"),
        reason="needs a real NVIDIA GPU and REMOTEDL_REAL_GPU=1",
    ),
]


@pytest.fixture(scope="module")
def real_box(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu")
    info = sandbox.up(make_env(base), name="gpubox", gpus=0, host_gpus=True)
    yield Box(info, {})
    sandbox.down(make_env(base), name="gpubox")


def torch_probe() -> list[str]:
    return [
        sys.executable,
        "-c",
        "import torch; n = torch.cuda.device_count(); "
        "print('count', n, torch.cuda.get_device_name(0) if n else '-')",
    ]


def test_status_parses_real_nvidia_smi(real_box, tmp_path):
    names = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    run = cli_for(real_box, tmp_path / "laptop")
    r = run("status", "--json")
    assert r.code == 0, r.err
    st = json.loads(r.out)
    assert st["nvidia"] is True, st
    assert st["gpus"], st
    for g in st["gpus"]:
        assert f"GPU {g['index']}: {g['name']} (UUID: {g['uuid']})" in names
        assert g["memory_total_mib"] > 0
    assert st["driver_version"]
    # The raw output the stand-in must match, kept for the record.
    raw = subprocess.run(gpumod.QUERY_GPUS, capture_output=True, text=True, check=True).stdout
    assert gpumod.parse_gpus(raw)[0].uuid == st["gpus"][0]["uuid"]
    print("REAL", raw)


def test_job_sees_exactly_its_gpu(real_box, project, tmp_path):
    run = cli_for(real_box, tmp_path / "laptop")
    r = run("run", "--gpu", "0", "--", *torch_probe(), cwd=project)
    assert r.code == 0, r.err
    assert "count 1 NVIDIA" in r.out
    r = run("run", "--cpu", "--", *torch_probe(), cwd=project)
    assert r.code == 0, r.err
    assert "count 0 -" in r.out
    r = run(
        "run",
        "--gpu",
        "0",
        "--",
        "sh",
        "-c",
        'echo "cvd=$CUDA_VISIBLE_DEVICES order=$CUDA_DEVICE_ORDER"',
        cwd=project,
    )
    assert "cvd=0 order=PCI_BUS_ID" in r.out
    count = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout.count(
        "GPU "
    )
    r = run("run", "--gpu", str(count), "--", "true", cwd=project)
    assert r.code == 2
    assert f"GPU {count} does not exist" in r.err


def test_foreign_gpu_process_is_seen_and_respected(real_box, project, tmp_path):
    hold = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import torch, time; x = torch.ones(1 << 28, device='cuda'); print('ready', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hold.stdout is not None
        assert hold.stdout.readline().strip() == "ready"
        run = cli_for(real_box, tmp_path / "laptop")

        def seen():
            st = json.loads(run("status", "--json").out)
            return [p for g in st["gpus"] for p in g["processes"] if p["pid"] == hold.pid] or None

        procs = retry_until(seen, seconds=20)
        raw = subprocess.run(gpumod.QUERY_APPS, capture_output=True, text=True).stdout
        print("REAL-APPS", repr(raw))
        if not procs:
            # Inside some containers nvidia-smi cannot map a process to its PID namespace.
            pytest.fail(f"nvidia-smi did not list pid {hold.pid}; it printed {raw!r}")
        assert procs[0]["user"] == real_box.info.user
        assert procs[0]["used_memory_mib"] > 0
        r = run("run", "--gpu", "0", "--", "true", cwd=project)
        assert r.code == 1
        assert f"GPU 0 is used by process {hold.pid}" in r.err
    finally:
        hold.kill()
        hold.wait(10)


def test_doctor_sees_the_gpu_through_torch(real_box, project, tmp_path):
    run = cli_for(real_box, tmp_path / "laptop")
    assert run("push", cwd=project).code == 0
    r = run("doctor", "--json", cwd=project)
    rep = json.loads(r.out)
    by = {(c["where"], c["name"]): c for c in rep["checks"]}
    print("DOCTOR", json.dumps(rep["checks"], indent=1))
    assert by[("box", "NVIDIA driver")]["status"] == "ok"
    assert by[("box", "CUDA")]["status"] == "ok"
    assert by[("box", "torch")]["status"] == "ok", by
    assert "sees 1 GPU" in by[("box", "torch")]["detail"]
    r = run("setup", "gpu-check", "--json", cwd=project)
    steps = {s["name"]: s for s in json.loads(r.out)[0]["steps"]}
    print("GPU-CHECK", json.dumps(steps, indent=1))
    assert steps["NVIDIA driver"]["status"] == "ok"
    assert (
        "NVIDIA H" in steps["GPUs visible to nvidia-smi"]["output"]
        or "GPU 0:" in steps["GPUs visible to nvidia-smi"]["output"]
    )
