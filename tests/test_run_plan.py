"""The run as a plan: ``remotedl.run.build_plan`` from settings and flags, and the GPU choice.
Pure logic: no box (the settings come from files in the test's directory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from remotedl.config import load_settings
from remotedl.errors import ConfigError, UsageError
from remotedl.run import RunPlan, build_plan, env_pairs, gpu_choice
from tests.conftest import make_env


def settings(tmp_path: Path, toml: str = ""):
    proj = tmp_path / "proj"
    proj.mkdir(parents=True, exist_ok=True)
    (proj / "remotedl.toml").write_text('host = "gpu1"\n' + toml)
    (proj / "train.py").write_text("print('hi')\n")
    return load_settings(make_env(tmp_path, cwd=proj), {})


def test_a_plan_takes_the_settings_and_the_flags_win(tmp_path):
    s = settings(
        tmp_path,
        'data = ["data"]\npull_on_end = ["out"]\nisolate = false\nstall_after = "10m"\n'
        'notify_desktop = true\nexclude = ["*.ckpt"]\n[env]\nA = "1"\nB = "2"\n',
    )
    plan = build_plan(
        s, ["train.py", "--lr", "0.1"], host="gpu1", remote_dir="~/p",
        env=["B=3", "C=4"], pull=["out", "logs"], data=["data", "more"], gpus=2, queue=True,
    )  # fmt: skip
    assert isinstance(plan, RunPlan)
    assert plan.script == "train.py" and plan.name == "train.py"
    assert plan.argv == ("train.py", "--lr", "0.1") and "train.py" in plan.command
    assert plan.env == {"A": "1", "B": "3", "C": "4"}  # --env after the settings' env
    assert plan.pull == ("out", "logs") and plan.data == ("data", "more")  # each once, settings first
    assert (plan.gpus, plan.count, plan.queue) == ("auto", 2, True)
    assert plan.isolate is False and plan.stall_after == 600 and plan.notify_desktop is True
    assert plan.excludes == ("*.ckpt",) and plan.remote_dir == "~/p" and plan.host == "gpu1"
    assert plan.follow and not plan.detach and plan.push
    assert (plan.image, plan.nodes, plan.slurm) == (None, 1, None)  # room for the next runtimes
    assert plan.ref(7) == "7"
    named = build_plan(s, ["--", "python", "-c", "pass"], host="gpu1", remote_dir="~/p", name="x",
                       ref_host=True, push=False)  # fmt: skip
    assert named.name == "x" and named.script is None and named.argv == ("python", "-c", "pass")
    assert named.ref(7) == "gpu1:7" and not named.push


def test_the_gpu_flags_as_a_choice():
    assert gpu_choice(gpu=None, gpus=None, cpu=False) == ("auto", None)
    assert gpu_choice(gpu="0,2", gpus=None, cpu=False) == ([0, 2], None)
    assert gpu_choice(gpu="auto", gpus=3, cpu=False) == ("auto", 3)
    assert gpu_choice(gpu="0", gpus=None, cpu=True) == ("none", None)
    assert gpu_choice(gpu=None, gpus=0, cpu=False) == ("none", None)
    with pytest.raises(UsageError, match="--gpus -1: give a number"):
        gpu_choice(gpu=None, gpus=-1, cpu=False)
    with pytest.raises(UsageError):
        gpu_choice(gpu="zero", gpus=None, cpu=False)
    # Slurm picks the devices: a count, one unless said; indices refused
    assert gpu_choice(gpu=None, gpus=None, cpu=False, slurm=True) == ("auto", 1)
    assert gpu_choice(gpu="auto", gpus=4, cpu=False, slurm=True) == ("auto", 4)
    assert gpu_choice(gpu=None, gpus=None, cpu=True, slurm=True) == ("none", None)
    with pytest.raises(UsageError, match="Slurm chooses"):
        gpu_choice(gpu="1", gpus=None, cpu=False, slurm=True)


def test_what_a_plan_refuses_before_anything_reaches_the_box(tmp_path):
    s = settings(tmp_path)
    with pytest.raises(UsageError, match="give a command"):
        build_plan(s, [], host="gpu1", remote_dir="~/p")
    with pytest.raises(UsageError, match="a detached job is not followed"):
        build_plan(s, ["train.py"], host="gpu1", remote_dir="~/p", pull=["out"], detach=True)
    with pytest.raises(UsageError) as e:
        build_plan(s, ["train.py"], host="gpu1", remote_dir="~/p", env=["MY-TOKEN=s3cr3t"])
    assert "s3cr3t" not in str(e.value)
    with pytest.raises(UsageError, match="--notify"):
        build_plan(s, ["train.py"], host="gpu1", remote_dir="~/p", notify=["not a url"])
    assert build_plan(s, ["train.py"], host="gpu1", remote_dir="~/p", notify=["not a url"],
                      no_notify=True).notify == ()  # fmt: skip
    bad = settings(tmp_path / "b", 'notify = ["not a url"]\n')
    with pytest.raises(ConfigError, match="notify"):
        build_plan(bad, ["train.py"], host="gpu1", remote_dir="~/p")
    assert env_pairs(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}


def test_a_plan_carries_the_jobs_outputs(tmp_path):
    # outputs home (issue 28): the settings' outputs, then --output, each once; the trackers'
    # directories with trackers = true; where they come home to; a bad path refused here.
    s = settings(tmp_path, 'outputs = ["ckpt/", "metrics.json"]\ntrackers = true\noutputs_dir = "res"\n')
    plan = build_plan(s, ["train.py"], host="gpu1", remote_dir="~/p", outputs=["metrics.json", "extra.txt"])
    assert plan.outputs[:3] == ("ckpt/", "metrics.json", "extra.txt")
    assert set(plan.outputs[3:]) == {"wandb/", "mlruns/"} and plan.trackers is True
    assert plan.outputs_base == s.project.root / "res"
    none = build_plan(settings(tmp_path / "n"), ["train.py"], host="gpu1", remote_dir="~/p")
    assert (none.outputs, none.trackers, none.project_id) == ((), False, None)
    with pytest.raises(UsageError, match="relative to the job's directory"):
        build_plan(s, ["train.py"], host="gpu1", remote_dir="~/p", outputs=["../up"])
