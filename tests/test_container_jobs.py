"""Jobs in a container image, against a real dockerd (tests/dockerengine.py) on the real sshd
box: output, exit status, the image's digest, kill, lost, --env values never in argv, data and
shared reachable, exactly the job's GPUs (stand-in device nodes), two containers at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import DockerBox, cli_for, process_gone, process_start, retry_until
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


def last_job(run, proj: Path, name: str) -> dict:
    jobs = json.loads(run("jobs", "--all", "--json", cwd=proj).out)
    return max((j for j in jobs if j["name"] == name), key=lambda j: j["created"])


def wait_running(run, proj: Path, job_id: str, docker_box: DockerBox) -> dict:
    """Until the job runs and its container is up."""

    def up():
        rec = record(run, proj, job_id)
        return rec["status"] == "running" and rec["container"] in running_containers(docker_box) and rec

    rec = retry_until(up, seconds=30)
    assert rec, record(run, proj, job_id)
    return rec


def test_kill_signals_the_job_inside_its_container(run, docker_box, proj):
    script(proj, "loop.sh", "trap 'echo got INT; exit 130' INT\necho up\nwhile true; do sleep 0.1; done\n")
    job_id = run("run", "--detach", "--cpu", "loop.sh", cwd=proj).out.strip()
    rec = wait_running(run, proj, job_id, docker_box)
    assert retry_until(lambda: "up" in run("logs", job_id, cwd=proj).out, seconds=20)
    r = run("kill", job_id, "--grace", "10", "--json", cwd=proj)
    assert r.code == 0, r.err
    assert json.loads(r.out)["status"] == "killed"
    assert "got INT" in run("logs", job_id, cwd=proj).out  # SIGINT reached the job's shell inside
    assert rec["container"] not in running_containers(docker_box)


def test_env_values_go_through_a_file_never_argv(run, docker_box, proj):
    secret = "s3cr3t-container-value"
    script(proj, "env.sh", 'echo "secret=$SECRET"\necho "multi=[$MULTI]"\necho ready\nsleep 300\n')
    job_id = run(
        "run", "--detach", "--cpu", "--env", f"SECRET={secret}", "--env", "MULTI=a\nb", "env.sh", cwd=proj
    ).out.strip()
    wait_running(run, proj, job_id, docker_box)
    assert retry_until(lambda: "ready" in run("logs", job_id, cwd=proj).out, seconds=20)
    log = run("logs", job_id, cwd=proj).out
    assert f"secret={secret}" in log and "multi=[a\nb]" in log
    for pid in os.listdir("/proc"):  # the job's processes, the engine's, the client: none
        if pid.isdigit():
            try:
                assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
            except OSError:
                continue
    jobs = docker_box.home / ".remotedl" / "jobs"
    assert not list(jobs.glob(f"{job_id}.container-env")), "the env file outlived the container's start"
    assert run("kill", job_id, cwd=proj).code == 0


def test_vanished_container_makes_the_job_lost(run, docker_box, proj):
    script(proj, "quiet.sh", "sleep 300\n")
    job_id = run("run", "--detach", "--gpu", "0", "quiet.sh", cwd=proj).out.strip()
    rec = wait_running(run, proj, job_id, docker_box)
    # Its runner and its `docker run` client die: the container runs on, and so does the job.
    leader = process_start(int(rec["pgid"]))
    os.kill(int(rec["runner_pid"]), signal.SIGKILL)
    os.killpg(int(rec["pgid"]), signal.SIGKILL)
    assert retry_until(lambda: process_gone(int(rec["pgid"]), leader), seconds=30)
    assert record(run, proj, job_id)["status"] == "running"
    docker_box.engine.docker("rm", "-f", rec["container"])
    after = retry_until(lambda: (r := record(run, proj, job_id))["status"] != "running" and r, seconds=20)
    assert after and after["status"] == "lost", after


def test_data_and_shared_are_reachable_inside(run, docker_box, proj):
    (proj / "data").mkdir()
    (proj / "data" / "x.txt").write_text("the data\n")
    toml = (proj / "remotedl.toml").read_text()
    (proj / "remotedl.toml").write_text(toml + 'data = ["data"]\nshared = ["out"]\n')
    script(proj, "io.sh", "cat data/x.txt\necho made > out/result.txt\n")
    r = run("run", "--cpu", "io.sh", cwd=proj)
    assert r.code == 0, r.err + r.out
    assert "the data" in r.out
    rec = last_job(run, proj, "io.sh")
    result = Path(rec["remote_dir"]) / "out" / "result.txt"
    assert result.read_text() == "made\n"
    assert result.stat().st_uid == os.getuid()  # the box user's, as on the host


def test_two_jobs_in_two_containers_at_once(run, docker_box, proj):
    script(proj, "hold.sh", "ls /dev | grep 'nvidia[0-9]'\nsleep 300\n")
    first = run("run", "--detach", "--gpu", "0", "--name", "a", "hold.sh", cwd=proj).out.strip()
    second = run("run", "--detach", "--gpu", "1", "--name", "b", "hold.sh", cwd=proj).out.strip()
    a = wait_running(run, proj, first, docker_box)
    b = wait_running(run, proj, second, docker_box)
    assert a["container"] != b["container"]
    assert {a["container"], b["container"]} <= set(running_containers(docker_box))
    assert retry_until(lambda: run("logs", first, cwd=proj).out.strip() == "nvidia0", seconds=20)
    assert retry_until(lambda: run("logs", second, cwd=proj).out.strip() == "nvidia1", seconds=20)
    assert run("kill", first, "--grace", "1", cwd=proj).code == 0
    assert run("kill", second, "--grace", "1", cwd=proj).code == 0


def test_a_missing_image_is_pulled_and_a_failed_pull_fails_the_job(run, docker_box, proj):
    # A registry on a closed loopback port: the pull is tried and fails, nothing leaves 127.0.0.1.
    r = run("run", "--image", "127.0.0.1:9/nothing:1", "--cpu", "true", cwd=proj)
    assert r.code != 0
    rec = last_job(run, proj, "true")
    assert rec["status"] == "failed"
    assert "could not pull 127.0.0.1:9/nothing:1" in rec["error"]
    assert "pulling 127.0.0.1:9/nothing:1" in run("logs", str(rec["id"]), cwd=proj).out


def test_no_image_runs_on_the_box(run, docker_box, proj):
    r = run(
        "run", "--no-image", "--cpu", "--", "sh", "-c", "test -e /etc/rdl-test-image || echo host", cwd=proj
    )
    assert r.code == 0, r.err
    rec = last_job(run, proj, "sh")
    assert rec.get("image") is None
    assert "host" in r.out


def test_nvidia_gpus_argument_names_exactly_the_jobs_devices(docker_box):
    """The NVIDIA runtime's --gpus as remotedl builds it, read back by a real engine (no GPU or
    toolkit here to start it: the request is what is checked)."""
    from remotedl.agent.runtimes.container import gpu_args

    words = gpu_args({"gpus": [1, 3]}, "nvidia", podman=False)
    name = "rdl-gpus-argv"
    docker_box.engine.docker("create", "--name", name, *words, IMAGE, "true")
    try:
        asked = "{{json .HostConfig.DeviceRequests}}"
        out = docker_box.engine.docker("inspect", "--format", asked, name).stdout
    finally:
        docker_box.engine.docker("rm", "-f", name, check=False)
    (request,) = json.loads(out)
    assert request["DeviceIDs"] == ["1", "3"]
    assert request["Capabilities"] == [["gpu"]]


def test_kill_stops_the_container_when_its_client_is_gone(run, docker_box, proj):
    script(proj, "quiet.sh", "sleep 300\n")
    job_id = run("run", "--detach", "--cpu", "quiet.sh", cwd=proj).out.strip()
    rec = wait_running(run, proj, job_id, docker_box)
    leader = process_start(int(rec["pgid"]))
    os.kill(int(rec["runner_pid"]), signal.SIGKILL)
    os.killpg(int(rec["pgid"]), signal.SIGKILL)  # `docker run` gone: only the engine can stop it
    assert retry_until(lambda: process_gone(int(rec["pgid"]), leader), seconds=30)
    r = run("kill", job_id, "--grace", "1", "--json", cwd=proj)
    assert r.code == 0, r.err
    assert json.loads(r.out)["status"] == "killed"
    assert rec["container"] not in running_containers(docker_box)


def test_setup_cmd_runs_inside_the_image_before_the_command(run, docker_box, proj):
    toml = (proj / "remotedl.toml").read_text()
    (proj / "remotedl.toml").write_text(toml + 'setup_cmd = "echo set-up > /tmp/rdl-setup"\n')
    r = run("run", "--cpu", "--", "cat", "/tmp/rdl-setup", "/etc/rdl-test-image", cwd=proj)
    assert r.code == 0, r.err + r.out
    assert "set-up\nthe test image" in r.out
    (proj / "remotedl.toml").write_text(toml + 'setup_cmd = "exit 4"\n')
    assert run("run", "--cpu", "--", "echo", "never", cwd=proj).code == 4


@pytest.fixture
def user_docker_box(docker_box: DockerBox, tmp_path: Path):
    """A box whose user is not root (rdl-dash), allowed on the test engine's socket."""
    import pwd

    from remotedl import sandbox
    from tests.conftest import have, make_env

    if not have("dash"):
        pytest.skip("dash is not installed here (`apt-get install dash`; .ci/run installs it)")
    base = tmp_path / "userbox"
    env = make_env(base)
    extra = {"DOCKER_HOST": docker_box.engine.host, "REMOTEDL_DEVICE_DIR": str(docker_box.engine.dev_dir)}
    info = sandbox.up(env, name="dockeruser", gpus=2, login_shell="dash", extra_env=extra)
    user = pwd.getpwnam(info.user)
    sock = docker_box.engine.directory / "docker.sock"
    docker_box.engine.directory.chmod(0o711)
    os.chown(sock, user.pw_uid, user.pw_gid)
    try:
        yield DockerBox(info, dict(env.environ), docker_box.engine), user
    finally:
        os.chown(sock, 0, 0)
        docker_box.engine.directory.chmod(0o700)
        sandbox.down(make_env(base), name="dockeruser")


def test_job_runs_as_the_box_user_and_its_files_are_the_users(user_docker_box, proj, tmp_path):
    box, user = user_docker_box
    run = cli_for(box, tmp_path / "laptop-user")
    toml = (proj / "remotedl.toml").read_text()
    (proj / "remotedl.toml").write_text(toml + 'shared = ["out"]\n')
    script(proj, "write.sh", 'echo "uid=$(id -u):$(id -g)"\necho mine > out/written.txt\n')
    r = run("run", "--gpu", "0", "write.sh", cwd=proj)
    assert r.code == 0, r.err + r.out
    assert f"uid={user.pw_uid}:{user.pw_gid}" in r.out
    rec = last_job(run, proj, "write.sh")
    written = Path(rec["remote_dir"]) / "out" / "written.txt"
    assert (written.stat().st_uid, written.stat().st_gid) == (user.pw_uid, user.pw_gid)


def test_doctor_checks_the_engine_the_image_and_a_gpu_container(run, docker_box, proj):
    r = run("doctor", "--json", cwd=proj)
    by = {c["name"]: c for c in json.loads(r.out)["checks"] if c["where"] == "box"}
    assert by["container engine"]["status"] == "ok", by
    assert by["image"]["status"] == "ok"
    assert "GiB free at" in by["image disk"]["detail"]
    # container_gpus = "devices": the stand-in nvidia-smi inside sees the one GPU it was given
    assert by["GPU container"] == {
        **by["GPU container"],
        "status": "ok",
        "detail": f"nvidia-smi -L in {IMAGE}: GPU 0: Stand-in GPU (nvidia0)",
    }
    (proj / "remotedl.toml").write_text('image = "missing:1"\ncontainer = "podman"\n')
    by = {c["name"]: c for c in json.loads(run("doctor", "--json", cwd=proj).out)["checks"]}
    if not shutil.which("podman"):  # the engine asked for is not there: said so, with the fix
        assert by["container engine"]["status"] == "fail"
        assert "podman is not installed" in by["container engine"]["detail"]
    (proj / "remotedl.toml").write_text('image = "missing:1"\ncontainer_gpus = "nvidia"\n')
    by = {c["name"]: c for c in json.loads(run("doctor", "--json", cwd=proj).out)["checks"]}
    assert by["image"]["status"] == "warn" and "first `remotedl run` pulls it" in by["image"]["fix"]
    assert by["GPU runtime"]["status"] == "warn"  # this dockerd has no NVIDIA runtime


def test_a_queued_container_job_starts_in_its_image_when_its_gpu_frees(run, docker_box, proj):
    script(proj, "hold.sh", "echo holding\nsleep 300\n")
    script(proj, "next.sh", "ls /dev | grep 'nvidia[0-9]'\necho cuda=$CUDA_VISIBLE_DEVICES\n")
    first = run("run", "--detach", "--gpu", "0", "hold.sh", cwd=proj).out.strip()
    wait_running(run, proj, first, docker_box)
    second = run("run", "--detach", "--gpu", "0", "--queue", "next.sh", cwd=proj).out.strip()
    assert record(run, proj, second)["status"] == "queued"
    assert run("kill", first, "--grace", "1", cwd=proj).code == 0
    ended = retry_until(lambda: (r := record(run, proj, second))["status"] == "succeeded" and r, seconds=60)
    assert ended, record(run, proj, second)
    assert "nvidia0\ncuda=0" in run("logs", second, cwd=proj).out


def test_images_lists_the_boxs_images_and_marks_the_jobs_one(run, docker_box, proj):
    r = run("images", cwd=proj)
    assert r.code == 0, r.err
    (line,) = [ln for ln in r.out.splitlines() if IMAGE in ln]
    assert line.startswith(f"* {IMAGE}")
    found = json.loads(run("images", "--json", cwd=proj).out)
    assert found["engine"].endswith("docker")
    assert IMAGE in [i["name"] for i in found["images"]]
    (proj / "remotedl.toml").write_text('image = "missing:1"\n')
    assert "missing:1 (image) is not on" in run("images", cwd=proj).err


def _host_python_mounts() -> list[str]:
    """container_args that lend the test image this machine's Python and its Jupyter (the venv
    the tests run in), read-only: the image itself is a busybox."""
    import sys

    args: list[str] = []
    mounts = ["/usr/lib", "/usr/lib64", sys.prefix]
    base = os.path.realpath(sys.base_prefix)
    if not base.startswith("/usr"):
        mounts.append(base)
    for m in dict.fromkeys(mounts):
        if os.path.isdir(m):
            args += ["-v", f"{m}:{m}:ro"]
    return [*args, "-e", f"PATH={sys.prefix}/bin:/usr/bin:/bin"]


def test_jupyter_in_an_image_through_the_tunnel(run, docker_box, proj, tmp_path):
    import urllib.request

    from remotedl.waiting import free_port

    words = ", ".join(json.dumps(a) for a in _host_python_mounts())
    (proj / "remotedl.toml").write_text(
        f'remote_dir = "~/container-tests/{tmp_path.name}"\ncontainer_gpus = "devices"\n'
        f"jupyter_image = \"{IMAGE}\"\ncontainer_args = [{words}]\n"
    )
    assert run("push", cwd=proj).code == 0
    local = free_port()
    r = run("jupyter", str(local), "--background", cwd=proj)
    try:
        assert r.code == 0, r.err
        url = r.out.strip().splitlines()[-1]
        token = url.split("token=")[1]
        status = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{local}/api/status?token={token}", timeout=10).read()
        )
        assert "started" in status
        name = f"remotedl-jupyter-{os.getuid()}"
        assert name in docker_box.engine.docker("ps", "--format", "{{.Names}}").stdout.split()
        for pid in os.listdir("/proc"):  # the token: in no process's arguments
            if pid.isdigit():
                try:
                    assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
                except OSError:
                    continue
        inside = docker_box.engine.docker("exec", name, "sh", "-c", "ls /dev | grep nvidia; pwd").stdout
        assert inside.split() == ["nvidia0", "nvidia1", "nvidiactl", inside.split()[-1]]
        assert inside.split()[-1].endswith(f"container-tests/{tmp_path.name}")  # the work tree
        # Found again, not started twice.
        r2 = run("jupyter", str(free_port()), "--background", cwd=proj)
        assert r2.code == 0, r2.err
        assert "found running" in r2.err and r2.out.strip().endswith(token)
    finally:
        run("tunnel", "--stop", "all")
        docker_box.engine.docker("rm", "-f", f"remotedl-jupyter-{os.getuid()}", check=False)


def test_docker_playbook_finds_the_engine_ready(run, docker_box, proj):
    r = run("setup", "docker", "--check", "--json", cwd=proj)
    assert r.code == 0, r.out + r.err
    (res,) = json.loads(r.out)
    steps = {s["name"]: s["status"] for s in res["steps"]}
    assert steps["the container engine is installed"] == "ok"
    assert steps["the Docker daemon runs and starts at boot"] == "ok"  # this box's dockerd answers
    assert steps["the box user may use Docker (the docker group)"] == "skipped"  # root
    # The stand-in nvidia-smi says there is a driver; no toolkit here: it would be installed.
    assert steps["the NVIDIA container toolkit (there is an NVIDIA driver)"] == "would-change"
    assert res["summary"]["failed"] == 0


def test_tensorboard_in_an_image_through_the_tunnel(run, docker_box, proj, tmp_path):
    import re
    import urllib.request

    from remotedl.waiting import free_port
    from tests.test_tensorboard import write_scalars

    words = ", ".join(json.dumps(a) for a in _host_python_mounts())
    remote = f"~/container-tests/{tmp_path.name}"
    (proj / "remotedl.toml").write_text(
        f'remote_dir = "{remote}"\ntensorboard_image = "{IMAGE}"\ncontainer_args = [{words}]\n'
    )
    assert run("push", cwd=proj).code == 0
    work = docker_box.home / remote.removeprefix("~/")
    write_scalars(work / "runs" / "exp1", "loss", [1.0, 0.5])
    local = free_port()
    r = run("tensorboard", "--local-port", str(local), "--background", cwd=proj)
    try:
        assert r.code == 0, r.err
        url = r.out.strip().splitlines()[-1]
        assert re.fullmatch(rf"http://127\.0\.0\.1:{local}/[0-9a-f]{{32}}/", url), url
        with urllib.request.urlopen(url + "data/runs", timeout=20) as answer:
            assert json.loads(answer.read()) == ["exp1"]
        names = docker_box.engine.docker("ps", "--format", "{{.Names}}").stdout.split()
        assert [n for n in names if n.startswith("remotedl-tb-")]  # it runs in a container
        r2 = run("tensorboard", "--local-port", str(free_port()), "--background", cwd=proj)
        assert r2.code == 0, r2.err
        assert "TensorBoard found running on the box" in r2.err
    finally:
        run("tunnel", "--stop", "all")
        for n in docker_box.engine.docker("ps", "--format", "{{.Names}}").stdout.split():
            if n.startswith("remotedl-tb-"):
                docker_box.engine.docker("rm", "-f", n, check=False)


def test_trackers_write_into_the_jobs_directory_inside_the_container(run, docker_box, proj):
    toml = (proj / "remotedl.toml").read_text()
    (proj / "remotedl.toml").write_text(toml + 'outputs = ["out"]\n')
    script(proj, "track.sh", 'echo "wandb=$WANDB_DIR"\necho "mlflow=$MLFLOW_TRACKING_URI"\n')
    r = run("run", "--cpu", "track.sh", cwd=proj)
    assert r.code == 0, r.err + r.out
    rec = last_job(run, proj, "track.sh")
    assert rec["trackers"]["WANDB_DIR"].startswith(rec["remote_dir"])  # mounted: the same path
    assert f"wandb={rec['trackers']['WANDB_DIR']}" in r.out
    assert f"mlflow={rec['trackers']['MLFLOW_TRACKING_URI']}" in r.out


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory):
    from tests import notifyfakes

    s = notifyfakes.start_services(tmp_path_factory.mktemp("notify-ca"))
    yield s
    s.stop()


def test_a_container_jobs_secret_is_hidden_in_its_notification(run, docker_box, proj, services):
    from tests.test_events import wait_hook

    toml = (proj / "remotedl.toml").read_text()
    (proj / "remotedl.toml").write_text(toml + f"notify = [{json.dumps(services.urls()['json'])}]\n")
    script(proj, "tell.sh", 'echo "key=$API_KEY"\n')
    r = run("run", "--detach", "--cpu", "-e", "API_KEY=s3cr3t-in-a-container", "tell.sh", cwd=proj)
    assert r.code == 0, r.err
    payload = wait_hook(services, int(r.out.strip().splitlines()[-1]), "succeeded")
    assert "key=****" in payload["message"] and "s3cr3t" not in json.dumps(payload)
