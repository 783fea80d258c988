"""Jobs in a container image with Podman (``container = "podman"``), against a real rootful
Podman private to the tests (tests/podmanengine.py) on the real sshd box: the main scenarios of
tests/test_container_jobs.py (output, exit status, the image's digest, exactly the job's GPUs,
kill, lost, --env values never in argv), Podman's CDI request for GPUs, ``images``, ``doctor``
and the ``docker`` playbook's check with ``engine=podman``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from remotedl import sandbox
from tests import podmanengine
from tests import test_container_jobs as common
from tests.conftest import Box, cli_for, make_env
from tests.dockerengine import IMAGE


@dataclass
class PodmanBox(Box):
    """A sandbox box whose sessions reach the test's Podman (its CONTAINERS_CONF...)."""

    engine: podmanengine.Podman


@pytest.fixture(scope="module")
def podman_box(box_base: Path) -> Iterator[PodmanBox]:
    try:
        engine = podmanengine.start(gpus=2)
    except podmanengine.PodmanUnavailable as e:
        pytest.skip(f"no Podman: {e}")
    base = box_base / "podman"
    try:
        env = make_env(base)
        extra = {**engine.env, "REMOTEDL_DEVICE_DIR": str(engine.dev_dir)}
        info = sandbox.up(env, name="podmanbox", gpus=2, extra_env=extra)
    except BaseException:
        podmanengine.stop(engine)
        raise
    yield PodmanBox(info, dict(env.environ), engine)
    try:
        sandbox.down(make_env(base), name="podmanbox")
    except Exception as e:  # a finalizer never raises
        print(f"sandbox down failed: {e}")
    podmanengine.stop(engine)


@pytest.fixture
def proj(project: Path, tmp_path: Path) -> Path:
    (project / "remotedl.toml").write_text(
        f'remote_dir = "~/container-tests/{tmp_path.name}"\nimage = "{IMAGE}"\n'
        'container = "podman"\ncontainer_gpus = "devices"\n'
    )
    return project


@pytest.fixture
def run(podman_box: PodmanBox, tmp_path: Path):
    return cli_for(podman_box, tmp_path / "laptop")


def test_job_runs_in_its_podman_image_with_exactly_its_gpus(run, podman_box, proj):
    common.script(
        proj,
        "probe.sh",
        'echo "cuda=[$CUDA_VISIBLE_DEVICES] image=$REMOTEDL_IMAGE"\n'
        "ls /dev | grep nvidia | tr '\\n' ' '; echo\n"
        "nvidia-smi\n"
        'echo "uid=$(id -u):$(id -g) pwd=$PWD"\n'
        'test -e /etc/rdl-test-image && echo "in the image"\n'
        "exit 3\n",
    )
    r = run("run", "probe.sh", "--gpu", "1", cwd=proj)
    assert r.code == 3, r.err + r.out
    assert "cuda=[0] image=rdl-test:1" in r.out
    assert "nvidia1 nvidiactl" in r.out and "nvidia0" not in r.out  # exactly the job's GPU
    assert "GPU 0: Stand-in GPU (nvidia1)" in r.out
    assert f"uid={os.getuid()}:{os.getgid()}" in r.out
    assert "in the image" in r.out
    rec = common.last_job(run, proj, "probe.sh")
    assert rec["status"] == "failed" and rec["exit_code"] == 3
    assert rec["engine"].endswith("podman") and rec["gpus"] == [1]
    assert f"pwd={rec['workdir']}" in r.out  # the checkout, at the same path
    # Podman keeps a manifest digest for an imported image too: the name it has there, pinned.
    image_id = podman_box.engine.podman("image", "inspect", "--format", "{{.Digest}}", IMAGE).stdout.strip()
    assert rec["image_digest"] == f"localhost/rdl-test@{image_id}"
    shown = run("show", str(rec["id"]), cwd=proj)
    assert f"{IMAGE} ({rec['image_digest']}), podman container {rec['container']}" in shown.out
    assert rec["container"] not in common.running_containers(podman_box)  # --rm: gone with the job


def test_kill_signals_the_job_inside_its_podman_container(run, podman_box, proj):
    common.test_kill_signals_the_job_inside_its_container(run, podman_box, proj)


def test_env_values_reach_a_podman_container_through_a_file(run, podman_box, proj):
    common.test_env_values_go_through_a_file_never_argv(run, podman_box, proj)


def test_vanished_podman_container_makes_the_job_lost(run, podman_box, proj):
    common.test_vanished_container_makes_the_job_lost(run, podman_box, proj)


def test_podman_gets_the_jobs_gpus_as_cdi_devices(podman_box):
    """Podman's GPUs are CDI devices (``--device nvidia.com/gpu=N``, as NVIDIA's toolkit
    documents for Podman): the request as remotedl builds it, read back by a real Podman, which
    looks the names up in its CDI registry (no NVIDIA spec here: it says which it lacks)."""
    from remotedl.agent.runtimes.container import gpu_args

    words = gpu_args({"gpus": [1, 3]}, "nvidia", podman=True)
    assert words == gpu_args({"gpus": [1, 3]}, "cdi", podman=True)
    name = "rdl-gpus-argv"
    try:
        podman_box.engine.podman("create", "--name", name, *words, IMAGE, "true")
        r = podman_box.engine.podman("start", name, check=False)
    finally:
        podman_box.engine.podman("rm", "-f", name, check=False)
    assert r.returncode != 0
    assert "unresolvable CDI devices nvidia.com/gpu=1, nvidia.com/gpu=3" in r.stderr, r.stderr


def test_images_lists_podmans_images_and_marks_the_jobs_one(run, podman_box, proj):
    r = run("images", cwd=proj)
    assert r.code == 0, r.err
    (line,) = [ln for ln in r.out.splitlines() if "rdl-test" in ln]
    assert line.startswith(f"* localhost/{IMAGE}")  # Podman's full name; the short one is it
    found = json.loads(run("images", "--json", cwd=proj).out)
    assert found["engine"].endswith("podman")
    (image,) = [i for i in found["images"] if i["name"] == f"localhost/{IMAGE}"]
    assert image["size"].endswith("B") and image["created"]
    (proj / "remotedl.toml").write_text('image = "missing:1"\ncontainer = "podman"\n')
    assert "missing:1 (image) is not on" in run("images", cwd=proj).err


def test_doctor_checks_podman_the_image_and_a_gpu_container(run, podman_box, proj):
    r = run("doctor", "--json", cwd=proj)
    by = {c["name"]: c for c in json.loads(r.out)["checks"] if c["where"] == "box"}
    assert by["container engine"]["status"] == "ok", by
    assert "podman" in by["container engine"]["detail"]
    assert by["image"]["status"] == "ok", by["image"]
    assert "GiB free at" in by["image disk"]["detail"]
    assert by["GPU container"]["status"] == "ok", by["GPU container"]
    assert by["GPU container"]["detail"] == f"nvidia-smi -L in {IMAGE}: GPU 0: Stand-in GPU (nvidia0)"
    # Podman's GPUs by default are CDI devices: no NVIDIA CDI spec here, said with the fix.
    (proj / "remotedl.toml").write_text(f'image = "{IMAGE}"\ncontainer = "podman"\n')
    by = {c["name"]: c for c in json.loads(run("doctor", "--json", cwd=proj).out)["checks"]}
    assert by["GPU runtime"]["status"] == "warn", by["GPU runtime"]
    assert "nvidia-ctk cdi generate" in by["GPU runtime"]["fix"]
    assert by["GPU container"]["status"] == "fail"
    assert "unresolvable CDI devices nvidia.com/gpu=0" in by["GPU container"]["detail"]


ROOTLESS_STEP = "the box user may run rootless Podman (newuidmap, subordinate uid and gid ranges)"


def test_docker_playbook_finds_podman_ready(run, podman_box, proj):
    r = run("setup", "docker", "--check", "--var", "engine=podman", "--json", cwd=proj)
    assert r.code == 0, r.out + r.err
    (res,) = json.loads(r.out)
    steps = {s["name"]: s["status"] for s in res["steps"]}
    assert steps["the container engine is installed"] == "ok", steps
    assert steps["Podman's container init (catatonit, for `run --init`)"] == "ok"
    assert steps[ROOTLESS_STEP] == "skipped"  # root
    assert steps["the Docker daemon runs and starts at boot"] == "skipped"  # Docker's steps: not Podman's
    assert steps["the box user may use Docker (the docker group)"] == "skipped"
    assert res["summary"]["failed"] == 0, steps


def test_docker_playbook_checks_rootless_podman_for_the_box_user(rootless_box, proj, tmp_path):
    box, _ = rootless_box
    run = cli_for(box, tmp_path / "laptop-user")
    r = run("setup", "docker", "--check", "--var", "engine=podman", "--json", cwd=proj)
    (res,) = json.loads(r.out)
    steps = {s["name"]: s["status"] for s in res["steps"]}
    # The sandbox's users have their ranges in /etc/subuid (useradd gives them) and newuidmap.
    assert steps[ROOTLESS_STEP] == "ok", steps
    assert steps["Podman's container init (catatonit, for `run --init`)"] == "ok"


@pytest.fixture
def rootless_box(podman_box: PodmanBox, tmp_path: Path):
    """A box whose user is not root (rdl-dash) and runs Podman rootless: its own storage, the
    test image imported as that user."""
    from tests.conftest import have

    if not have("dash"):
        pytest.skip("dash is not installed here (`apt-get install dash`; .ci/run installs it)")
    user = sandbox.ensure_user("dash")
    extra = podmanengine.rootless(podman_box.engine, user.pw_uid, user.pw_gid)
    base = tmp_path / "userbox"
    env = make_env(base)
    try:
        extra_env = {**extra, "REMOTEDL_DEVICE_DIR": str(podman_box.engine.dev_dir)}
        info = sandbox.up(env, name="podmanuser", gpus=2, login_shell="dash", extra_env=extra_env)
        yield PodmanBox(info, dict(env.environ), podman_box.engine), user
    finally:
        sandbox.down(make_env(base), name="podmanuser")
        podmanengine.stop_rootless(podman_box.engine, user.pw_uid, user.pw_gid, extra)


def test_rootless_podman_job_runs_as_the_box_user_and_its_files_are_the_users(rootless_box, proj, tmp_path):
    box, user = rootless_box
    run = cli_for(box, tmp_path / "laptop-user")
    toml = (proj / "remotedl.toml").read_text()
    (proj / "remotedl.toml").write_text(toml + 'shared = ["out"]\n')
    body = 'echo "uid=$(id -u):$(id -g)"\necho mine > out/written.txt\nls /dev | grep nvidia\n'
    common.script(proj, "write.sh", body)
    r = run("run", "--gpu", "1", "write.sh", cwd=proj)
    assert r.code == 0, r.err + r.out
    assert f"uid={user.pw_uid}:{user.pw_gid}" in r.out  # --userns=keep-id: the user's own ids
    assert "nvidia1\nnvidiactl" in r.out
    rec = common.last_job(run, proj, "write.sh")
    written = Path(rec["remote_dir"]) / "out" / "written.txt"
    assert (written.stat().st_uid, written.stat().st_gid) == (user.pw_uid, user.pw_gid)


def test_jupyter_in_a_podman_image_through_the_tunnel(run, podman_box, proj, tmp_path):
    import urllib.request

    from remotedl.waiting import free_port

    words = ", ".join(json.dumps(a) for a in common._host_python_mounts())
    (proj / "remotedl.toml").write_text(
        f'remote_dir = "~/container-tests/{tmp_path.name}"\ncontainer = "podman"\n'
        f'container_gpus = "devices"\njupyter_image = "{IMAGE}"\ncontainer_args = [{words}]\n'
    )
    assert run("push", cwd=proj).code == 0
    local = free_port()
    name = f"remotedl-jupyter-{os.getuid()}"
    r = run("jupyter", str(local), "--background", cwd=proj)
    try:
        assert r.code == 0, r.err
        token = r.out.strip().splitlines()[-1].split("token=")[1]
        url = f"http://127.0.0.1:{local}/api/status?token={token}"
        assert "started" in json.loads(urllib.request.urlopen(url, timeout=10).read())
        inside = podman_box.engine.podman("exec", name, "sh", "-c", "ls /dev | grep nvidia; pwd").stdout
        assert inside.split()[:3] == ["nvidia0", "nvidia1", "nvidiactl"]
        assert inside.split()[-1].endswith(f"container-tests/{tmp_path.name}")  # the work tree
        r2 = run("jupyter", str(free_port()), "--background", cwd=proj)  # found again, not twice
        assert r2.code == 0, r2.err
        assert "found running" in r2.err and r2.out.strip().endswith(token)
    finally:
        run("tunnel", "--stop", "all")
        podman_box.engine.podman("rm", "-f", name, check=False)


def test_tensorboard_in_a_podman_image_through_the_tunnel(run, podman_box, proj, tmp_path):
    import urllib.request

    from remotedl.waiting import free_port
    from tests.test_tensorboard import write_scalars

    words = ", ".join(json.dumps(a) for a in common._host_python_mounts())
    remote = f"~/container-tests/{tmp_path.name}"
    (proj / "remotedl.toml").write_text(
        f'remote_dir = "{remote}"\ncontainer = "podman"\ntensorboard_image = "{IMAGE}"\n'
        f"container_args = [{words}]\n"
    )
    assert run("push", cwd=proj).code == 0
    write_scalars(podman_box.home / remote.removeprefix("~/") / "runs" / "exp1", "loss", [1.0, 0.5])
    local = free_port()
    r = run("tensorboard", "--local-port", str(local), "--background", cwd=proj)
    try:
        assert r.code == 0, r.err
        with urllib.request.urlopen(r.out.strip().splitlines()[-1] + "data/runs", timeout=20) as answer:
            assert json.loads(answer.read()) == ["exp1"]
        names = podman_box.engine.podman("ps", "--format", "{{.Names}}").stdout.split()
        assert [n for n in names if n.startswith("remotedl-tb-")]  # it runs in a container
        r2 = run("tensorboard", "--local-port", str(free_port()), "--background", cwd=proj)
        assert r2.code == 0, r2.err
        assert "TensorBoard found running on the box" in r2.err
    finally:
        run("tunnel", "--stop", "all")
        for n in podman_box.engine.podman("ps", "--format", "{{.Names}}").stdout.split():
            if n.startswith("remotedl-tb-"):
                podman_box.engine.podman("rm", "-f", n, check=False)
