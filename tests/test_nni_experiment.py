"""A real NNI experiment: nnictl create with the CPU demo config (its cache and fast paths), cut to two
trials on a few images; every one must succeed."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
nni_experiment = pytest.importorskip("nni.experiment")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nnictl() -> list[str]:
    exe = shutil.which("nnictl") or str(Path(sys.executable).with_name("nnictl"))
    return [exe]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_nni_demo_experiment_runs_two_successful_trials(demo_root, tmp_path):
    data = ["--dataset", "demo", "--demo_images", "48", "16", "--path_to_save_csv", str(demo_root)]
    built = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_cache.py"), *data, "--out",
                            str(tmp_path / "cache"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    text = (REPO / "experiments" / "config_demo_cpu.yml").read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith("trialCommand:"):
            assert "--cache_dir data/demo_cache" in line and "--demo_images 1800 640" in line
            line = line.replace("--cache_dir data/demo_cache", f"--cache_dir {tmp_path / 'cache'}")
            line = line.replace("--demo_images 1800 640", f"--demo_images 48 16 --path_to_save_csv {demo_root}")
            line = line.replace("--num_epoch 2", "--num_epoch 1")
        elif line.startswith("maxTrialNumber:"):
            line = "maxTrialNumber: 2"
        elif line.startswith("searchSpaceFile:"):
            line = f"searchSpaceFile: {REPO / 'experiments' / 'search_space_demo.json'}"
        elif line.startswith("trialCodeDirectory:"):
            line = f"trialCodeDirectory: {REPO}"
        lines.append(line)
    lines.append(f"experimentWorkingDirectory: {tmp_path / 'nni-experiments'}")
    config = tmp_path / "config.yml"
    config.write_text("\n".join(lines) + "\n")

    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    created = subprocess.run([*nnictl(), "create", "--config", str(config), "--port", str(port)],
                             capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert created.returncode == 0, created.stdout + created.stderr
    experiment = None
    try:
        experiment = nni_experiment.Experiment.connect(port)
        deadline = time.time() + 900
        finished = {"SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED", "EARLY_STOPPED"}
        while True:
            status = experiment.get_status()
            jobs = experiment.list_trial_jobs()
            if status in ("DONE", "STOPPED", "ERROR") or (
                status == "NO_MORE_TRIAL" and len(jobs) == 2 and all(j.status in finished for j in jobs)
            ):
                break
            assert time.time() < deadline, "NNI experiment did not finish in 15 minutes"
            time.sleep(3)
        assert len(jobs) == 2, jobs
        for job in jobs:
            assert job.status == "SUCCEEDED", (job.trialJobId, job.status, job.stderrPath)
            final = job.finalMetricData[0].data
            while isinstance(final, str):
                final = json.loads(final)
            assert math.isfinite(final["srcc"]), final
            assert "default" in final
    finally:
        if experiment is not None:
            subprocess.run([*nnictl(), "stop", experiment.id], capture_output=True, text=True, timeout=120, env=env)
        else:
            subprocess.run([*nnictl(), "stop", "--all"], capture_output=True, text=True, timeout=120, env=env)
    deadline = time.time() + 60
    while port_open(port) and time.time() < deadline:
        time.sleep(1)
    assert not port_open(port), "the NNI manager is still running"
