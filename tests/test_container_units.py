"""The container runtime's argv and files (no engine needed), and the laptop's --image."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from remotedl.agent import runtimes
from remotedl.agent.runtimes import container
from remotedl.agent.runtimes.container import (
    ContainerRuntime,
    container_env,
    container_name,
    gpu_args,
    run_argv,
    write_env_file,
)
from remotedl.agent.store import AgentError, kind_of
from remotedl.errors import UsageError
from remotedl.schema import StartRequest


def rec_of(**extra):
    return {
        "id": 7,
        "mark": "0123456789abcdef",
        "name": "train.py",
        "cwd": "/home/u/proj/.remotedl/jobs/7",
        "workdir": "/home/u/proj/.remotedl/jobs/7",
        "remote_dir": "/home/u/proj",
        "image": "nvcr.io/nvidia/pytorch:24.10-py3",
        "gpus": [1, 3],
        "want": {"gpus": [1, 3]},
        "container_gpus": "nvidia",
        "container_args": ["--shm-size=8g"],
        **extra,
    }


def test_nvidia_runtime_gets_exactly_the_jobs_gpus_as_one_csv_field():
    assert gpu_args(rec_of(), "nvidia", podman=False) == ["--gpus", '"device=1,3"']
    assert gpu_args(rec_of(gpus=[2]), "nvidia", podman=False) == ["--gpus", '"device=2"']


def test_cdi_and_podman_name_each_gpu_as_a_cdi_device():
    cdi = ["--device", "nvidia.com/gpu=1", "--device", "nvidia.com/gpu=3"]
    assert gpu_args(rec_of(), "cdi", podman=False) == cdi
    # Podman: with SELinux labels off for the container, as NVIDIA documents for Podman's CDI
    assert gpu_args(rec_of(), "nvidia", podman=True) == ["--security-opt", "label=disable", *cdi]
    assert gpu_args(rec_of(), "cdi", podman=True) == ["--security-opt", "label=disable", *cdi]


def test_no_gpu_words_for_a_cpu_job_or_mode_none():
    assert gpu_args(rec_of(gpus=[]), "nvidia", podman=False) == []
    assert gpu_args(rec_of(), "none", podman=False) == []


def test_device_mode_passes_the_nodes_to_their_dev_paths(tmp_path, monkeypatch):
    for name in ("nvidia1", "nvidia3", "nvidiactl"):
        (tmp_path / name).touch()
    monkeypatch.setenv("REMOTEDL_DEVICE_DIR", str(tmp_path))
    assert gpu_args(rec_of(), "devices", podman=False) == [
        "--device", f"{tmp_path}/nvidia1:/dev/nvidia1",
        "--device", f"{tmp_path}/nvidia3:/dev/nvidia3",
        "--device", f"{tmp_path}/nvidiactl:/dev/nvidiactl",
    ]  # fmt: skip
    with pytest.raises(AgentError, match=r"no device .*nvidia2"):
        gpu_args(rec_of(gpus=[2]), "devices", podman=False)


def test_gpus_count_from_zero_inside_and_a_cpu_job_sees_none():
    env = container_env(rec_of(), {"LR": "0.1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["LR"] == "0.1" and env["REMOTEDL_JOB_ID"] == "7"
    assert "PATH" not in env and "HOME" not in env  # the image's own apply
    cpu = container_env(rec_of(gpus=[], want={"gpus": "none"}), {})
    assert cpu["CUDA_VISIBLE_DEVICES"] == ""


def test_env_file_is_private_and_values_with_line_breaks_go_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("REMOTEDL_BOX_STATE", str(tmp_path))
    (tmp_path / "jobs").mkdir()
    path, by_name = write_env_file(7, {"TOKEN": "s3cret value=x", "PEM": "a\nb"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "TOKEN=s3cret value=x\n"
    assert by_name == ["PEM"]


def test_run_argv_has_no_values_and_ties_the_container_to_its_job(monkeypatch):
    monkeypatch.setattr(container.os.path, "exists", lambda p: False)
    rec = rec_of(links=[])
    argv = run_argv("/usr/bin/docker", rec, ["sh", "-c", "x"], Path("/s/jobs/7.container-env"), ["PEM"])
    assert argv[:5] == ["/usr/bin/docker", "run", "--rm", "--init", "--pull=never"]
    assert argv[5:7] == ["--name", "remotedl-7-01234567"] and container_name(rec) == "remotedl-7-01234567"
    assert "remotedl.job=7:0123456789abcdef" in argv
    assert argv[argv.index("-u") + 1] == f"{os.getuid()}:{os.getgid()}"
    assert argv[argv.index("-v") + 1] == "/home/u/proj:/home/u/proj"  # checkout, data, shared
    assert argv[argv.index("-w") + 1] == rec["workdir"]
    assert argv[argv.index("--env-file") + 1] == "/s/jobs/7.container-env"
    assert argv[argv.index("-e") + 1] == "PEM"  # by name: the client's environment holds it
    image_at = argv.index(rec["image"])
    assert argv[image_at - 1] == "--shm-size=8g"  # container_args, just before the image
    assert argv[image_at + 1 :] == ["sh", "-c", "x"]


def test_rootless_podman_keeps_the_users_ids(monkeypatch):
    monkeypatch.setattr(container.os, "getuid", lambda: 1000)
    monkeypatch.setattr(container.os, "getgid", lambda: 1000)
    argv = run_argv("/usr/bin/podman", rec_of(), ["true"], Path("/e"), [])
    assert "--userns=keep-id" in argv and argv[argv.index("-u") + 1] == "1000:1000"
    assert "--gpus" not in argv and "nvidia.com/gpu=1" in argv
    # Podman's init passes signals to its child only: a second one with -g, to the job's group
    assert argv[argv.index(rec_of()["image"]) + 1 :] == ["/run/podman-init", "-g", "--", "true"]


def test_podmans_full_image_names_are_the_names_a_user_writes():
    from remotedl.images import same_image

    assert same_image("rdl-test:1", "localhost/rdl-test:1")
    assert same_image("ubuntu:22.04", "docker.io/library/ubuntu:22.04")
    assert same_image("user/img:2", "docker.io/user/img:2")
    assert same_image("nvcr.io/nvidia/pytorch:24.10-py3", "nvcr.io/nvidia/pytorch:24.10-py3")
    assert not same_image("ubuntu:22.04", "docker.io/library/ubuntu:24.04")
    assert not same_image("ubuntu:22.04", "quay.io/ubuntu:22.04")


def test_a_path_docker_cannot_mount_is_refused():
    with pytest.raises(AgentError, match="cannot mount"):
        run_argv("docker", rec_of(remote_dir="/home/u/a:b"), ["true"], Path("/e"), [])


def test_records_and_requests_with_an_image_are_container_jobs():
    assert kind_of({"image": "x"}) == "container"
    assert kind_of({"image": "x", "scheduler": "slurm"}) == "slurm"
    assert kind_of({}) == "box"
    assert isinstance(runtimes.for_request(StartRequest(command="x", image="x")), ContainerRuntime)
    assert isinstance(runtimes.of({"image": "x"}), ContainerRuntime)


def test_engine_asked_for_and_not_installed_says_so(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(AgentError, match="podman is not installed on the box"):
        container.find_engine("podman")
    with pytest.raises(AgentError, match="docker or podman is not installed"):
        container.find_engine(None)


def _engine(bindir: Path, name: str) -> Path:
    prog = bindir / name
    prog.write_text("#!/bin/sh\nexit 0\n")
    prog.chmod(0o755)
    return prog


def test_with_both_engines_docker_is_taken_only_when_it_answers(tmp_path, monkeypatch):
    """A box with Podman for its users and a Docker engine they may not reach (its socket
    not theirs: not in the docker group): a job with an image goes to Podman, not to an error."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    sock = tmp_path / "docker.sock"
    monkeypatch.setattr(container, "DOCKER_SOCKET", str(sock))
    docker = _engine(bindir, "docker")
    podman = _engine(bindir, "podman")
    assert container.find_engine(None) == str(podman)  # no socket: docker reaches nothing
    assert container.find_engine("docker") == str(docker)  # asked for: taken as asked
    sock.write_text("")
    assert container.find_engine(None) == str(docker)
    monkeypatch.setattr(container.os, "access", lambda path, mode: path != str(sock))
    assert container.find_engine(None) == str(podman)  # there, but not this user's to open
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/user/1000/docker.sock")  # rootless docker
    assert container.find_engine(None) == str(docker)
    podman.unlink()
    monkeypatch.delenv("DOCKER_HOST")
    assert container.find_engine(None) == str(docker)  # the only one: its own error says why


class FakeSettings:
    """The few settings ``image_of`` reads."""

    def __init__(self, **values):
        self.values = {"image": None, "container": None, "container_gpus": "nvidia", "container_args": []}
        self.values.update(values)

    def get(self, key):
        return self.values[key]


def test_the_run_plan_takes_the_image_from_flag_setting_and_no_image():
    from remotedl.run import image_of

    assert image_of(FakeSettings(), None) == (None, None)  # type: ignore[arg-type]
    image, spec = image_of(FakeSettings(image="a:1", container="podman"), None)  # type: ignore[arg-type]
    assert image == "a:1" and spec == {"engine": "podman", "gpus": "nvidia", "args": []}
    assert image_of(FakeSettings(image="a:1"), "b:2")[0] == "b:2"  # type: ignore[arg-type]
    assert image_of(FakeSettings(image="a:1"), None, off=True) == (None, None)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="Slurm host"):
        image_of(FakeSettings(image="a:1"), None, slurm=True)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="not an image name"):
        image_of(FakeSettings(), "--privileged")  # type: ignore[arg-type]


def test_the_agent_refuses_an_image_name_that_would_be_an_option(tmp_path, monkeypatch):
    from remotedl.agent.runtimes.base import StartPlan

    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    (tmp_path / "docker").write_text("#!/bin/sh\n")
    (tmp_path / "docker").chmod(0o755)
    req = StartRequest(command="true", image="--privileged")
    plan = StartPlan(req, str(tmp_path), False, None, [], [], {})
    with pytest.raises(AgentError, match="is not an image name"):
        ContainerRuntime().create(None, plan, [])  # type: ignore[arg-type]


def test_a_runner_whose_record_has_the_digest_asks_the_engine_nothing(tmp_path, monkeypatch):
    # The starter looks the image up while the runner starts and records its digest: the
    # runner takes it from the record. Its engine here is no program at all: a question to it
    # would fail the job ("could not ..."), as the second lookup on every start did.
    from remotedl.agent import runner, store
    from remotedl.agent.store import box_lock, load, save

    monkeypatch.setenv("REMOTEDL_BOX_STATE", str(tmp_path / "state"))
    store.ensure_dirs()
    log = tmp_path / "7.log"
    log.touch()
    found = rec_of(command="true", status="starting", engine=str(tmp_path / "no-docker"), log=str(log))
    found["image_digest"] = "sha256:ab"
    with box_lock():
        save(found)
    rec = runner._pull(found)
    assert (rec["status"], rec["image_digest"], rec.get("error")) == ("starting", "sha256:ab", None)
    assert load(7)["image_digest"] == "sha256:ab" and log.read_bytes() == b""
    # Without a digest the runner asks itself: an engine that cannot be run fails the job.
    with box_lock():
        save(dict(found, image_digest=None))
    rec = runner._pull(found)
    assert rec["status"] == "failed" and "no-docker" in rec["error"]


def test_the_scripts_pick_the_engine_as_a_job_does(tmp_path, monkeypatch):
    """`images`, `doctor`, `jupyter --image` and `tensorboard --image` choose the engine in sh on
    the box (``images.PICK_ENGINE``): the same choice as a job's (``find_engine``)."""
    import subprocess

    from remotedl.images import PICK_ENGINE

    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DOCKER_HOST", raising=False)

    def in_sh() -> str:
        env = {"PATH": str(bindir), "HOME": str(tmp_path)}
        if "DOCKER_HOST" in os.environ:
            env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
        script = PICK_ENGINE + "pick_engine"
        r = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True)
        return r.stdout.strip()

    def as_job() -> str:
        try:
            return Path(container.find_engine(None)).name
        except AgentError:
            return ""

    assert in_sh() == as_job() == ""
    podman = _engine(bindir, "podman")
    assert in_sh() == as_job() == "podman"
    _engine(bindir, "docker")
    assert in_sh() == as_job()  # both: docker only where its default socket is this user's
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/user/1000/docker.sock")
    assert in_sh() == as_job() == "docker"
    monkeypatch.delenv("DOCKER_HOST")
    (tmp_path / ".docker" / "contexts").mkdir(parents=True)
    assert in_sh() == as_job() == "docker"
    podman.unlink()
    (tmp_path / ".docker" / "contexts").rmdir()
    assert in_sh() == as_job() == "docker"
