"""The cloud VM launchers: every verb's `--dry-run` prints well-formed gcloud commands (parsed here), the
multi-host run sets each process's coordinates, bad use fails with usage, and the scripts pass shellcheck."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TPU_ENV = {"TPU_NAME": "s3-v5e", "ZONE": "us-west4-a", "PROJECT": "my-project"}
GPU_ENV = {"GPU_HOSTS": "gpu-0,gpu-1", "ZONE": "us-central1-a"}
TRAIN = ["python", "-m", "s3_jax.train", "--config", "configs/s3_qwen7b.py:8-3-3", "--workdir", "runs/a b"]


def _dry(script, env, *args):
  done = subprocess.run(["bash", str(REPO / "launch" / script), "--dry-run", *args], capture_output=True,
                        text=True, env={"PATH": "/usr/bin:/bin", **env}, cwd=REPO)
  assert done.returncode == 0, done.stderr
  return [shlex.split(line) for line in done.stdout.splitlines()]


def _remote(command):
  """The shell command a `gcloud ... ssh --command=...` runs, as words."""
  [flag] = [a for a in command if a.startswith("--command=")]
  return shlex.split(flag[len("--command="):])


def test_tpu_vm_verbs():
  [create] = _dry("tpu_vm.sh", TPU_ENV, "create")
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "s3-v5e"]
  assert {"--accelerator-type=v5litepod-16", "--zone=us-west4-a", "--project=my-project"} <= set(create)
  archive, scp, untar = _dry("tpu_vm.sh", TPU_ENV, "copy")
  assert archive[:3] == ["git", "-C", str(REPO)] and "archive" in archive
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert _remote(untar)[:3] == ["mkdir", "-p", "s3_jax"]
  [setup] = _dry("tpu_vm.sh", TPU_ENV, "setup")
  assert "--worker=all" in setup and "requirements-tpu.txt" in _remote(setup)
  [run] = _dry("tpu_vm.sh", TPU_ENV, "run", "--", *TRAIN)
  words = _remote(run)
  assert "--worker=all" in run and "S3_JAX_DIST=1" in words
  start = words.index("nohup") + 1
  assert words[start:start + len(TRAIN)] == TRAIN  # the command survives both quotings intact
  [logs] = _dry("tpu_vm.sh", TPU_ENV, "logs")
  assert "--worker=0" in logs and _remote(logs)[:3] == ["tail", "-n", "100"]
  [delete] = _dry("tpu_vm.sh", TPU_ENV, "delete")
  assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "s3-v5e"] and "--quiet" in delete


def test_gpu_vm_verbs():
  creates = _dry("gpu_vm.sh", GPU_ENV, "create")
  hosts = ("gpu-0", "gpu-1")
  assert [c[:5] for c in creates] == [["gcloud", "compute", "instances", "create", h] for h in hosts]
  assert "--accelerator=type=nvidia-h100-80gb,count=8" in creates[0]
  copy = _dry("gpu_vm.sh", GPU_ENV, "copy")
  assert [c[:3] for c in copy[1:]] == [["gcloud", "compute", "scp"], ["gcloud", "compute", "ssh"]] * 2
  setup = _dry("gpu_vm.sh", GPU_ENV, "setup")
  assert len(setup) == 2 and all("requirements-gpu.txt" in _remote(c) for c in setup)
  runs = _dry("gpu_vm.sh", GPU_ENV, "run", "--", *TRAIN)
  for i, command in enumerate(runs):
    words = _remote(command)
    assert command[3] == f"gpu-{i}"
    assert {"JAX_COORDINATOR_ADDRESS=gpu-0:8476", "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={i}"} <= set(words)
    start = words.index("nohup") + 1
    assert words[start:start + len(TRAIN)] == TRAIN
  [single] = _dry("gpu_vm.sh", {**GPU_ENV, "GPU_HOSTS": "gpu-0"}, "run", "--", *TRAIN)
  assert not any(w.startswith("JAX_") for w in _remote(single))  # one host: no distributed setup
  [delete] = _dry("gpu_vm.sh", GPU_ENV, "delete")
  assert delete[:6] == ["gcloud", "compute", "instances", "delete", "gpu-0", "gpu-1"]


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gpu_vm.sh"])
def test_bad_use_fails_with_usage(script):
  env = TPU_ENV if script == "tpu_vm.sh" else GPU_ENV
  bad = subprocess.run(["bash", str(REPO / "launch" / script), "--dry-run", "explode"], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", **env})
  assert bad.returncode == 2 and "usage:" in bad.stderr
  empty = subprocess.run(["bash", str(REPO / "launch" / script), "--dry-run", "run", "--"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env})
  assert empty.returncode == 2 and "usage:" in empty.stderr
  unset = subprocess.run(["bash", str(REPO / "launch" / script), "--dry-run", "create"], capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin"})
  assert unset.returncode != 0 and ("TPU_NAME" in unset.stderr or "GPU_HOSTS" in unset.stderr)


def test_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
  scripts = [*sorted(str(p) for p in (REPO / "launch").glob("*.sh")), str(REPO / ".ci" / "run")]
  done = subprocess.run([shellcheck, "--severity=style", *scripts], capture_output=True, text=True)
  assert done.returncode == 0, done.stdout
