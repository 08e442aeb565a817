"""The cloud VM launchers: every verb's `--dry-run` prints well-formed gcloud commands (parsed here), the
multi-host run sets each process's coordinates, bad use fails with usage, and the scripts pass shellcheck."""

import os
import shlex
import shutil
import socket
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


def _stand_in_gcloud(tmp_path, stderr="", status=0):
  """A `gcloud` on PATH that records each call's arguments (one line each) and fails with `stderr` when
  `status` is nonzero."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
  bin_dir.mkdir()
  script = bin_dir / "gcloud"
  script.write_text(f"#!/bin/bash\necho \"$*\" >> {shlex.quote(str(calls))}\n"
                    f"echo {shlex.quote(stderr)} >&2\nexit {status}\n")
  script.chmod(0o755)
  return {"PATH": f"{bin_dir}:/usr/bin:/bin"}, calls


def _calls(calls):
  return calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.faults
@pytest.mark.parametrize("script, env", [("tpu_vm.sh", TPU_ENV), ("gpu_vm.sh", GPU_ENV),
                                         ("services.sh", {"RETRIEVER_HOST": "vm-r", "ZONE": "z"})])
def test_flags_anywhere_and_unknown_flags_never_reach_gcloud(tmp_path, script, env):
  """`create --dry-run` (the flag after the verb) used to run the real gcloud with the flag passed on."""
  path, calls = _stand_in_gcloud(tmp_path)
  verb = "stop" if script == "services.sh" else "create"

  def run(*args):
    return subprocess.run(["bash", str(REPO / "launch" / script), *args], capture_output=True, text=True,
                          env={**path, **env}, cwd=REPO, timeout=30)

  after = run(verb, "--dry-run")
  assert after.returncode == 0, after.stderr
  assert after.stdout.startswith("gcloud compute") and _calls(calls) == []
  bogus = run(verb, "--bogus")
  assert bogus.returncode == 2 and "unknown option --bogus" in bogus.stderr and _calls(calls) == []
  usage = run("--help")
  assert usage.returncode == 0 and "--dry-run" in usage.stdout and _calls(calls) == []
  header = Path(REPO / "launch" / script).read_text().splitlines()[1]  # line 1 is the shebang
  assert usage.stdout.splitlines()[0] == header.removeprefix("# ")


@pytest.mark.faults
@pytest.mark.parametrize("stderr, calls_expected, can_pass", [
    ("ERROR: (gcloud.compute.tpus.tpu-vm.create) unrecognized arguments: --bogus", 1, False),
    ("ERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: caller lacks tpu.nodes.create", 1, False),
    ("ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: no more capacity in the zone", 3, True),
    ("ERROR: (gcloud.compute.tpus.tpu-vm.create) Quota 'TPUV5E' exceeded", 3, True),
    ("ERROR: (gcloud.compute.tpus.tpu-vm.create) There is no more capacity in the zone \"us-west4-a\"; you "
     "can try in another zone where Cloud TPU Nodes are offered", 3, True)])
def test_create_retries_only_errors_that_can_pass(tmp_path, stderr, calls_expected, can_pass):
  path, calls = _stand_in_gcloud(tmp_path, stderr=stderr, status=1)
  done = subprocess.run(["bash", str(REPO / "launch" / "tpu_vm.sh"), "create"], capture_output=True,
                        text=True, env={**path, **TPU_ENV, "CREATE_RETRIES": "3", "RETRY_SECONDS": "0"},
                        cwd=REPO, timeout=30)
  assert done.returncode != 0 and stderr in done.stderr
  assert len(_calls(calls)) == calls_expected
  assert ("after 3 attempts" in done.stderr) == can_pass
  assert ("not retried" in done.stderr) == (not can_pass)


def test_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
  scripts = [*sorted(str(p) for p in (REPO / "launch").glob("*.sh")), str(REPO / ".ci" / "run")]
  done = subprocess.run([shellcheck, "--severity=style", *scripts], capture_output=True, text=True)
  assert done.returncode == 0, done.stdout


SERVICES_ENV = {"RETRIEVER_HOST": "svc-0", "GENERATOR_HOST": "svc-1", "ZONE": "us-central1-a",
                "RETRIEVER_INDEX": "/data/wiki 18/index", "RETRIEVER_GPUS": "0,1",
                "GENERATOR_MODEL": "/models/Qwen2.5-14B-Instruct-GPTQ-Int4", "GENERATOR_GPUS": "2,3,4,5"}


def _serve_words(remote_words):
  """The `python -m s3_jax.serve ...` words inside a started service's remote command."""
  start = remote_words.index("nohup") + 1
  return remote_words[start:remote_words.index(">", start)]


def test_services_verbs():
  retriever, generator, wait_r, wait_g, *ready = _dry("services.sh", SERVICES_ENV, "start")
  assert retriever[:4] == ["gcloud", "compute", "ssh", "svc-0"] and generator[3] == "svc-1"
  words = _remote(retriever)
  assert "CUDA_VISIBLE_DEVICES=0,1" in words
  assert _serve_words(words) == [".venv/bin/python", "-m", "s3_jax.serve", "retriever", "--index",
                                 "/data/wiki 18/index", "--host", "0.0.0.0", "--port", "50051"]
  serve = _serve_words(_remote(generator))
  assert "CUDA_VISIBLE_DEVICES=2,3,4,5" in _remote(generator)
  options = dict(zip(serve[4::2], serve[5::2], strict=True))
  assert options["--backend"] == "vllm" and options["--tensor-parallel"] == "4"  # one shard per GPU
  assert options["--model"] == SERVICES_ENV["GENERATOR_MODEL"] and options["--port"] == "50052"
  for command, service, port in ((wait_r, "retriever", 50051), (wait_g, "generator", 50052)):
    words = _remote(command)
    assert words[words.index("s3_jax.serve") + 1:] == ["wait", f"--{service}", f"127.0.0.1:{port}",
                                                       "--timeout", "1800"]
  assert ready == [["retriever", "ready:", "--config.retriever.address=svc-0:50051"],
                   ["generator", "ready:", "--config.generator.address=svc-1:50052"]]
  [stop] = _dry("services.sh", SERVICES_ENV, "stop", "generator")
  assert stop[3] == "svc-1" and "kill" in _remote(stop)
  [logs] = _dry("services.sh", SERVICES_ENV, "logs", "retriever")
  assert "services/retriever.log" in _remote(logs)
  tp2 = _dry("services.sh", {**SERVICES_ENV, "GENERATOR_TP": "2"}, "start", "generator")[0]
  assert "2" == _serve_words(_remote(tp2))[_serve_words(_remote(tp2)).index("--tensor-parallel") + 1]


def test_services_token_never_in_a_command():
  token = "s3cr3t-t0ken"
  done = subprocess.run(["bash", str(REPO / "launch" / "services.sh"), "--dry-run", "push-token"],
                        capture_output=True, text=True, cwd=REPO, env={
                            "PATH": "/usr/bin:/bin", **SERVICES_ENV, "CLIENT_HOSTS": "train-0,train-1",
                            "S3_JAX_AUTH_TOKEN": token})
  assert done.returncode == 0, done.stderr
  commands = [shlex.split(line) for line in done.stdout.splitlines()]
  assert sorted(c[3] for c in commands) == ["svc-0", "svc-1", "train-0", "train-1"]
  assert token not in done.stdout and all(_remote(c)[-3:] == ["cat", ">", ".s3_jax_env"] for c in commands)
  for script in ("tpu_vm.sh", "gpu_vm.sh"):  # the run verbs load it on the hosts
    env = TPU_ENV if script == "tpu_vm.sh" else GPU_ENV
    assert all(". ~/.s3_jax_env;" in " ".join(_remote(c)) for c in _dry(script, env, "run", "--", *TRAIN))


def test_services_bad_use():
  script = str(REPO / "launch" / "services.sh")
  cases = [({}, ["start"], "RETRIEVER_HOST"), ({**SERVICES_ENV}, ["start", "ranker"], "usage:"),
           ({**SERVICES_ENV}, ["explode"], "usage:"),
           ({k: v for k, v in SERVICES_ENV.items() if k != "RETRIEVER_INDEX"}, ["start"], "RETRIEVER_INDEX"),
           ({"GENERATOR_HOST": "svc-1"}, ["stop", "retriever"], "RETRIEVER_HOST"),
           ({**SERVICES_ENV}, ["push-token"], "S3_JAX_AUTH_TOKEN")]
  for env, args, message in cases:
    done = subprocess.run(["bash", script, "--dry-run", *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **env})
    assert done.returncode != 0 and message in done.stderr, (args, done.stderr)


def test_services_start_wait_stop_locally(tmp_path):
  """The real thing on this machine: a BM25 retriever started by the script answers searches like the index
  it serves, `wait` sees its Health, `stop` ends it."""
  from conftest import FIXTURES

  from s3_jax.retrieval import build_index, load_retriever
  from s3_jax.services.retriever_client import RetrieverClient

  build_index(FIXTURES / "corpus_contents.jsonl", tmp_path / "index", "bm25")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "RETRIEVER_HOST": "local",
         "RETRIEVER_INDEX": str(tmp_path / "index"), "RETRIEVER_PORT": str(port), "WAIT_SECONDS": "120",
         "SERVICES_DIR": str(tmp_path / "services"), "PYTHON": sys.executable}

  def script(*args):
    return subprocess.run(["bash", str(REPO / "launch" / "services.sh"), *args], capture_output=True,
                          text=True, env=env, timeout=300)

  started = script("start")
  try:
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"--config.retriever.address=127.0.0.1:{port}" in started.stdout
    assert "retriever at 127.0.0.1" in started.stdout and "SERVING" in started.stdout
    again = script("start")  # idempotent: the running service is kept
    assert again.returncode == 0 and "already running" in again.stdout
    client = RetrieverClient(f"127.0.0.1:{port}")
    queries = ["Carmen opera", "capital of France"]
    expected = load_retriever(tmp_path / "index").search(queries, 3)
    assert [[d.id for d in docs] for docs in client.search(queries, 3)] == [[d.id for d in docs]
                                                                             for docs in expected]
    client.close()
    assert script("logs").returncode == 0
  finally:
    stopped = script("stop")
  assert stopped.returncode == 0, stopped.stderr
  assert not (tmp_path / "services" / "retriever.pid").exists()
  gone = subprocess.run([sys.executable, "-m", "s3_jax.serve", "wait", "--retriever", f"127.0.0.1:{port}",
                         "--timeout", "3"], capture_output=True, text=True, cwd=REPO)
  assert gone.returncode == 1 and f"retriever at 127.0.0.1:{port}" in gone.stderr
