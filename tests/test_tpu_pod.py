"""tpu/pod.py: the gcloud commands of every verb (dry runs), one-line usage errors, and the
--local launcher's process handling with a stand-in for memlm_jax.train."""

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_POD_PY = os.path.join(_ROOT, "tpu", "pod.py")
_spec = importlib.util.spec_from_file_location("tpu_pod", _POD_PY)
pod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pod)

V5E = ["--name=my-v5e", "--zone=us-west4-a", "--project=my-proj"]
V4 = ["--name=my-v4", "--zone=us-central2-b"]
# Gin values a shell user writes with quotes inside quotes, and spaces.
USER_FLAGS = ["--gin_file=runs/train.gin", "--gin_file=tiny/infini_lm_demo.gin", "--gin.MODEL_DIR='gs://b/r'",
              "--gin.passkey_eval.label='Infini (delta), 2 stages'", '--gin.X="double quoted"',
              "--gin.Y='it'\"'\"'s'", "--gin.Z=[('embed', None)]"]


def dry_run(capsys, *argv):
  """(printed commands split back into argv lists, stderr) of `pod.py --dry_run argv`."""
  assert pod.main(["--dry_run", *argv]) == 0
  out, err = capsys.readouterr()
  return [shlex.split(line) for line in out.splitlines()], err


def remote_command(argv):
  """The --command string of a gcloud ssh argv."""
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command


def python_args(command):
  """The launcher argv inside a remote launch command: from `python` to the log redirection."""
  words = shlex.split(command)
  start = words.index("python")
  return words[start:words.index(">>")]


def test_create_v5e_16_queued_spot_and_plain_reserved(capsys):
  (queued,), _ = dry_run(capsys, *V5E, "create", "--accelerator=v5litepod-16", "--queued", "--spot")
  assert queued == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-v5e", "--zone=us-west4-a",
                    "--project=my-proj", "--node-id=my-v5e", "--accelerator-type=v5litepod-16",
                    "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
  (plain,), _ = dry_run(capsys, "create", "--accelerator=v5litepod-16", "--reserved", *V5E)  # flags after the verb
  assert plain == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-v5e", "--zone=us-west4-a",
                   "--project=my-proj", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
                   "--reserved"]


def test_create_v4_32_defaults_and_overrides(capsys):
  (plain,), _ = dry_run(capsys, *V4, "create", "--accelerator=v4-32")
  assert plain == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-v4", "--zone=us-central2-b",
                   "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]  # no --project: gcloud's config
  (queued,), _ = dry_run(capsys, *V4, "create", "--accelerator=v4-32", "--queued", "--reserved",
                         "--runtime_version=v2-alpha-tpuv4")
  assert queued[3:5] == ["queued-resources", "create"]
  assert "--runtime-version=v2-alpha-tpuv4" in queued and queued[-1] == "--reserved"
  assert not any(a.startswith("--project") for a in queued)


def test_setup_copies_head_to_every_worker_and_installs_the_tpu_extra(capsys):
  (archive, scp, ssh), _ = dry_run(capsys, *V5E, "setup", "--allow_dirty")
  tarball = pod.tarball_path("my-v5e")
  assert archive == ["git", "-C", _ROOT, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "my-v5e:memlm_jax.tar.gz",
                 "--zone=us-west4-a", "--project=my-proj", "--worker=all"]
  assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5e", "--zone=us-west4-a",
                     "--project=my-proj", "--worker=all"]
  words = shlex.split(remote_command(ssh))
  assert "~/memlm_jax.tar.gz" in words and "python3.11" in words
  assert words[-6:-3] == ["-c", "constraints.txt", "-e"] and words[-3].startswith(".[tpu]")


def test_dirty_files_lists_tracked_changes_only(tmp_path):
  def git(*args):
    subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
  git("init", "-q")
  (tmp_path / "a.py").write_text("x = 1\n")
  git("add", "a.py")
  git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "a")
  (tmp_path / "untracked.py").write_text("")
  assert pod.dirty_files(str(tmp_path)) == []
  (tmp_path / "a.py").write_text("x = 2\n")
  assert pod.dirty_files(str(tmp_path)) == ["a.py"]


@pytest.mark.parametrize("target, accelerator", [(V5E, "v5litepod-16"), (V4, "v4-32")])
def test_launch_passes_the_flags_through_exactly(capsys, target, accelerator):
  (ssh,), err = dry_run(capsys, *target, "launch", f"--accelerator={accelerator}", "--", *USER_FLAGS)
  assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in ssh
  assert f"--zone={target[1].split('=')[1]}" in ssh
  command = remote_command(ssh)
  assert python_args(command) == ["python", "-m", "memlm_jax.train", "--gin.initialize_distributed.mode='always'",
                                  *USER_FLAGS]
  words = shlex.split(command)
  assert words[words.index(">>") + 1] == "~/memlm_logs/train.log" and "nohup" in words and "setsid" in words
  assert err == ""  # MODEL_DIR is on gs://


def test_launch_eval_module_run_name_and_model_dir_warning(capsys):
  flags = ["--gin_file=runs/eval.gin", "--gin.MODEL_DIR='runs/local_dir'"]
  (ssh,), err = dry_run(capsys, *V4, "launch", "--module=eval", "--run=ev1", "--accelerator=v4-32", "--", *flags)
  assert python_args(remote_command(ssh)) == ["python", "-m", "memlm_jax.eval",
                                              "--gin.initialize_distributed.mode='always'", *flags]
  assert "~/memlm_logs/ev1.log" in shlex.split(remote_command(ssh))
  assert err.startswith("warning: MODEL_DIR 'runs/local_dir' is not a gs:// path: a v4-32 has 4 workers")
  _, err = dry_run(capsys, *V4, "launch", "--accelerator=v4-8", "--", *flags)
  assert err == ""  # one worker: a local MODEL_DIR is fine
  _, err = dry_run(capsys, *V4, "launch", "--", "--gin_bindings=MODEL_DIR = 'runs/x'")
  assert err.startswith("warning: MODEL_DIR 'runs/x'")
  assert [pod.num_workers(a) for a in ("v5litepod-8", "v5litepod-16", "v4-8", "v4-32", "v5p-16", "v6e-256")] == \
         [1, 4, 1, 4, 2, 64]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_launch_and_stop_commands_in_a_real_shell(tmp_path):
  """The remote commands run by bash in a fake home: the launcher gets exactly the user's
  arguments, in the background with its pid recorded, and stop kills it."""
  home, fake_bin = tmp_path / "home", tmp_path / "bin"
  venv_bin = home / "memlm_jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  fake_bin.mkdir()
  (venv_bin / "activate").write_text('PATH="$HOME/memlm_jax/.venv/bin:$PATH"\n')
  (venv_bin / "python").write_text('#!/bin/sh\necho $$ > "$HOME/python.pid"\nprintf "%s\\0" "$@" > "$HOME/args"\n'
                                   'echo "training"\nexec sleep 30\n')
  (fake_bin / "sudo").write_text('#!/bin/sh\necho "$@" >> "$HOME/sudo.log"\n')
  for path in (venv_bin / "python", fake_bin / "sudo"):
    path.chmod(0o755)
  env = {"HOME": str(home), "PATH": f"{fake_bin}:{os.environ['PATH']}"}
  command = pod.remote_launch_command("train", USER_FLAGS, "run1")
  result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30, check=False)
  assert result.returncode == 0, result.stderr
  deadline = time.time() + 10
  while not (home / "args").exists() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.1)
  args = (home / "args").read_text().split("\0")[:-1]
  assert args == ["-m", "memlm_jax.train", "--gin.initialize_distributed.mode='always'", *USER_FLAGS]
  pid = int((home / "python.pid").read_text())
  assert int((home / "memlm_logs" / "run1.pid").read_text()) == pid and _alive(pid)
  assert os.readlink(home / "memlm_logs" / "latest.log") == "run1.log"
  assert "training" in (home / "memlm_logs" / "run1.log").read_text()
  result = subprocess.run(["bash", "-c", pod.remote_stop_command()], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
  assert result.returncode == 0, result.stderr
  _assert_all_gone([pid])
  assert not (home / "memlm_logs" / "run1.pid").exists()
  assert "rm -f /tmp/libtpu_lockfile" in (home / "sudo.log").read_text()


def test_logs_stop_delete_status(capsys):
  (logs,), _ = dry_run(capsys, *V5E, "logs")
  assert "--worker=0" in logs and shlex.split(remote_command(logs)) == ["tail", "-n", "50", "~/memlm_logs/latest.log"]
  (logs,), _ = dry_run(capsys, *V5E, "logs", "--worker=all", "--follow", "--run=ev1", "--lines=5")
  assert "--worker=all" in logs and shlex.split(remote_command(logs))[:5] == ["tail", "-n", "5", "-F",
                                                                              "~/memlm_logs/ev1.log"]
  (stop,), _ = dry_run(capsys, *V4, "stop")
  assert stop[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in stop
  command = remote_command(stop)
  assert "/dev/accel*" in command and "sudo lsof -t" in command and "sudo rm -f /tmp/libtpu_lockfile" in command
  (delete,), _ = dry_run(capsys, *V4, "delete")
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-v4", "--zone=us-central2-b", "--quiet"]
  (delete,), _ = dry_run(capsys, *V5E, "delete", "--queued")
  assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-v5e", "--zone=us-west4-a",
                    "--project=my-proj", "--force", "--quiet"]
  (status,), _ = dry_run(capsys, *V5E, "status", "--queued")
  assert status[3:6] == ["queued-resources", "describe", "my-v5e"]
  (delete,), _ = dry_run(capsys, "--name=my-tpu", "delete")
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--quiet"]  # gcloud's zone, project


@pytest.mark.parametrize("argv, names", [
    ([*V4, "create", "--accelerator=v4-32", "--spot", "--reserved"], ["--reserved", "--spot"]),
    ([*V4, "launch", "--bogus", "--", "--gin_file=x.gin"], ["--bogus"]),
    (["--local=2", "create", "--accelerator=v4-8"], ["--local", "create"]),
    ([*V4, "create"], ["--accelerator"]),
    (["--zone=z", "stop"], ["--name"]),
    ([*V4, "create", "--accelerator=v5e-16"], ["v5litepod-16"]),
    ([*V4, "create", "--accelerator=v9x-8"], ["--runtime_version"]),
    ([*V4, "launch"], ["--"]),
    ([*V4, "stop", "--", "--gin_file=x.gin"], ["launch"]),
    ([*V4, "logs", "--worker=first"], ["--worker"]),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, names):
  assert pod.main(["--dry_run", *argv]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
  assert all(name in err for name in names), err


def test_cli_exit_code_2_before_running_anything():
  result = subprocess.run([sys.executable, _POD_PY, "--name=x", "--zone=z", "create", "--spot", "--reserved",
                           "--accelerator=v4-8"], capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1


def test_local_dry_run_gives_each_process_its_id(capsys, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
  lines, _ = dry_run(capsys, "--local=2", "--local_devices=3", "launch", "--", *USER_FLAGS)
  assert len(lines) == 2
  coordinators = set()
  for i, words in enumerate(lines):
    assert words[:3] == ["env", "XLA_FLAGS=--xla_cpu_foo=1 --xla_force_host_platform_device_count=3",
                         "JAX_PLATFORMS=cpu"]
    argv = words[3:]
    assert argv[1:3] == ["-m", "memlm_jax.train"] and argv[-len(USER_FLAGS):] == USER_FLAGS
    assert f"--gin.initialize_distributed.process_id={i}" in argv
    assert "--gin.initialize_distributed.num_processes=2" in argv
    coordinators |= {a for a in argv if a.startswith("--gin.initialize_distributed.coordinator_address=")}
  (address,) = coordinators
  assert address.startswith("--gin.initialize_distributed.coordinator_address='127.0.0.1:")
  lines, _ = dry_run(capsys, "--local=2", "--port=1234", "launch", "--", "--gin_file=x.gin")
  assert "--gin.initialize_distributed.coordinator_address='127.0.0.1:1234'" in lines[1]


# A stand-in for memlm_jax.train: writes its pid (and a child's) to <pid_dir>/<process id>, then
# fails if its process id is in FAIL, else sleeps SLEEP seconds.
_WORKER = textwrap.dedent("""
    import os, subprocess, sys, time
    flags = dict(a.split("=", 1) for a in sys.argv[1:])
    pid_dir, fail, sleep = flags["--pid_dir"], flags["--fail"].split(","), float(flags["--sleep"])
    process_id = flags["--gin.initialize_distributed.process_id"]
    child = subprocess.Popen(["sleep", "60"])
    with open(os.path.join(pid_dir, process_id + ".tmp"), "w") as f:
      f.write(f"{os.getpid()} {child.pid}")
    os.replace(os.path.join(pid_dir, process_id + ".tmp"), os.path.join(pid_dir, process_id))
    print(f"worker {process_id} running", flush=True)
    if process_id in fail:
      print("Traceback: something broke on this worker", flush=True)
      sys.exit(3)
    time.sleep(sleep)
    print(f"worker {process_id} done", flush=True)
    child.kill()
""")


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
  except FileNotFoundError:
    return False


def _pids(pid_dir, n):
  return [int(p) for i in range(n) for p in (pid_dir / str(i)).read_text().split()]


def _launcher(tmp_path, fail, sleep):
  (tmp_path / "fakepod_worker.py").write_text(_WORKER)
  pid_dir = tmp_path / "pids"
  pid_dir.mkdir()
  env = {**os.environ, "PYTHONPATH": str(tmp_path)}
  argv = [sys.executable, _POD_PY, "--local=2", f"--log_dir={tmp_path / 'logs'}", "launch",
          "--module=fakepod_worker", "--", f"--pid_dir={pid_dir}", f"--fail={fail}", f"--sleep={sleep}"]
  return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), pid_dir


def _assert_all_gone(pids, within=5.0):
  deadline = time.time() + within
  while any(_alive(p) for p in pids) and time.time() < deadline:
    time.sleep(0.05)
  assert not [p for p in pids if _alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_failure_kills_the_other_worker_and_reports_it(tmp_path):
  start = time.time()
  launcher, pid_dir = _launcher(tmp_path, fail="1", sleep=60)
  out, err = launcher.communicate(timeout=30)
  assert launcher.returncode == 3
  assert time.time() - start < 20  # not the 60 s worker 0 would sleep
  assert "error: worker 1 of 2 exited with code 3" in err
  assert "Traceback: something broke on this worker" in err  # the log's tail
  assert "worker 0 running" in out  # worker 0's log is echoed
  _assert_all_gone(_pids(pid_dir, 2))  # both workers and their children


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_success_writes_every_log(tmp_path):
  launcher, _ = _launcher(tmp_path, fail="", sleep=0)
  _, err = launcher.communicate(timeout=30)
  assert launcher.returncode == 0, err
  for i in range(2):
    assert f"worker {i} done" in (tmp_path / "logs" / f"worker_{i}.log").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_sigterm_to_the_launcher_stops_every_worker(tmp_path):
  launcher, pid_dir = _launcher(tmp_path, fail="", sleep=60)
  deadline = time.time() + 20
  while not all((pid_dir / str(i)).exists() for i in range(2)) and time.time() < deadline:
    time.sleep(0.05)
  launcher.send_signal(signal.SIGTERM)
  _, err = launcher.communicate(timeout=20)
  assert launcher.returncode == 128 + signal.SIGTERM and "SIGTERM: stopping all workers" in err
  _assert_all_gone(_pids(pid_dir, 2))


def test_local_logs_tails_the_worker_files(tmp_path, capsys):
  (tmp_path / "worker_0.log").write_text("a\n")
  (tmp_path / "worker_1.log").write_text("b\n")
  (tail,), _ = dry_run(capsys, "--local=2", f"--log_dir={tmp_path}", "logs", "--worker=all", "--lines=7")
  assert tail == ["tail", "-n", "7", str(tmp_path / "worker_0.log"), str(tmp_path / "worker_1.log")]
