"""Jobs in a container image, against a real dockerd (tests/dockerengine.py) on the real sshd
box: output, exit status, the image's digest, kill, lost, --env values never in argv, data and
shared reachable, exactly the job's GPUs (stand-in device nodes), two containers at once."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import DockerBox, cli_for, retry_until
from tests.dockerengine import IMAGE


@pytest.fixture
def proj(project: Path, tmp_path: Path) -> Path:
    (project / "remotedl.toml").write_text(
        f'remote_dir = "~/container-tests/{tmp_path.name}"\nimage = "{IMAGE}"\ncontainer_gpus = "devices"\n'
    )
    return project


@pytest.fixture
def run(docker_box: DockerBox, tmp_path: Path):
    return cli_for(docker_box, tmp_path / "laptop")


def script(proj: Path, name: str, body: str) -> None:
    (proj / name).write_text("#!/bin/sh\n" + body)
    (proj / name).chmod(0o755)


def record(run, proj: Path, job_id: str) -> dict:
    r = run("show", job_id, "--json", cwd=proj)
    assert r.code == 0, r.err
    return json.loads(r.out)


def running_containers(docker_box: DockerBox) -> list[str]:
    out = docker_box.engine.docker("ps", "--filter", "label=remotedl.job", "--format", "{{.Names}}").stdout
    return out.split()


def test_job_runs_in_its_image_with_exactly_its_gpus(run, docker_box, proj):
    script(
        proj,
        "probe.sh",
        'echo "cuda=[$CUDA_VISIBLE_DEVICES] image=$REMOTEDL_IMAGE"\n'
        "ls /dev | grep nvidia | tr '\\n' ' '; echo\n"
        "nvidia-smi\n"
        'echo "uid=$(id -u):$(id -g) pwd=$PWD"\n'
        'test -e /bin/busybox && echo "in the image"\n'
        "exit 3\n",
    )
    r = run("run", "probe.sh", "--gpu", "1", cwd=proj)
    assert r.code == 3, r.err + r.out
    assert "cuda=[0] image=rdl-test:1" in r.out
    assert "nvidia1 nvidiactl" in r.out and "nvidia0" not in r.out  # exactly the job's GPU
    assert "GPU 0: Stand-in GPU (nvidia1)" in r.out
    assert f"uid={os.getuid()}:{os.getgid()}" in r.out
    assert "in the image" in r.out
    jobs = json.loads(run("jobs", "--all", "--json", cwd=proj).out)
    (rec,) = [j for j in jobs if j["name"] == "probe.sh"]
    assert rec["status"] == "failed" and rec["exit_code"] == 3
    assert rec["image"] == IMAGE and rec["gpus"] == [1]
    assert f"pwd={rec['workdir']}" in r.out  # the checkout, at the same path
    assert rec["image_digest"].startswith("sha256:")
    assert rec["container"].startswith(f"remotedl-{rec['id']}-")
    shown = run("show", str(rec["id"]), cwd=proj)
    assert f"{IMAGE} ({rec['image_digest']}), docker container {rec['container']}" in shown.out
    assert rec["container"] not in running_containers(docker_box)  # --rm: gone with the job
