#!/usr/bin/env python3
r"""Runs memlm_jax gin experiments on Cloud TPU VMs and pods: a thin wrapper around gcloud.

  python tpu/pod.py --name=my-v5e --zone=us-west4-a create --accelerator=v5litepod-16 --queued --spot
  python tpu/pod.py --name=my-v5e --zone=us-west4-a setup
  python tpu/pod.py --name=my-v5e --zone=us-west4-a launch -- --gin_file=runs/train.gin \
      --gin_file=tiny/infini_lm_demo.gin --gin.MODEL_DIR="'gs://my-bucket/infini'"
  python tpu/pod.py --name=my-v5e --zone=us-west4-a logs --follow
  python tpu/pod.py --name=my-v5e --zone=us-west4-a stop
  python tpu/pod.py --name=my-v5e --zone=us-west4-a delete --queued

  python tpu/pod.py --local=2 launch -- --gin_file=...    # rehearse a 2-host run on this machine

Global flags go before or after the verb; everything after `--` goes to the launcher verbatim.
`--dry_run` prints the commands, one per line, and runs nothing. tpu/README.md is the walkthrough.
Standard library only: importing this file is cheap.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# On each worker, relative to the home directory (where `gcloud ... ssh --command` starts).
REMOTE_DIR = "memlm_jax"
REMOTE_LOGS = "memlm_logs"
REMOTE_TARBALL = "memlm_jax.tar.gz"
LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"
MODULE_SHORTHANDS = ("train", "eval", "infer")
VERBS = ("create", "setup", "launch", "logs", "stop", "delete", "status")
LOCAL_VERBS = ("launch", "logs")
LOG_TAIL_LINES = 20

# Accelerator-type prefix -> (default runtime version, how much of the type's number one worker
# of a multi-worker slice holds, the largest number a single worker has). The number counts
# TensorCores for v2-v5p (8 a worker) and chips for v5e / v6e (4 a worker, but 8 on one worker).
_GENERATIONS = {
    "v2": ("tpu-ubuntu2204-base", 8, 8),
    "v3": ("tpu-ubuntu2204-base", 8, 8),
    "v4": ("tpu-ubuntu2204-base", 8, 8),
    "v5p": ("v2-alpha-tpuv5", 8, 8),
    "v5litepod": ("v2-alpha-tpuv5-lite", 4, 8),
    "v6e": ("v2-alpha-tpuv6e", 4, 8),
}
_ACCELERATOR = re.compile(r"(?P<gen>[a-z0-9]+)-(?P<size>\d+)")
_TPU_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class UsageError(Exception):
  """A bad flag or value; the message is one line naming it and what was expected."""


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage block) that the caller turns into exit code 2."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, allow_abbrev=False, **kwargs)

  def error(self, message: str):
    raise UsageError(f"{message} (python tpu/pod.py {self.prog.split(' ', 1)[-1]} --help lists the flags)"
                     if " " in self.prog else f"{message} (python tpu/pod.py --help lists the verbs)")


def _add_global_flags(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
  # The verb parsers get the same flags with SUPPRESS defaults, so a global flag may follow the
  # verb without a verb parser's default overwriting a value given before it.
  def default(value):
    return value if with_defaults else argparse.SUPPRESS

  group = parser.add_argument_group("global flags (before or after the verb)")
  group.add_argument("--name", default=default(None), help="TPU VM / queued resource name (lowercase, digits, -).")
  group.add_argument("--zone", default=default(None),
                     help="Cloud zone, e.g. us-west4-a (default: gcloud's compute/zone config).")
  group.add_argument("--project", default=default(None), help="Cloud project (default: gcloud's core/project config).")
  group.add_argument("--dry_run", action="store_true", default=default(False),
                     help="Print every command, one per line, and run nothing.")
  group.add_argument("--local", type=int, default=default(None), metavar="N",
                     help="Run `launch` as N processes on this machine (a rehearsal of an N-worker pod).")
  group.add_argument("--local_devices", type=int, default=default(4), metavar="D",
                     help="Simulated CPU devices per --local process (default 4).")
  group.add_argument("--port", type=int, default=default(None),
                     help="--local coordinator port (default: a free one).")
  group.add_argument("--log_dir", default=default(None),
                     help="--local logs: <log_dir>/worker_<i>.log (default runs/pod_local/<name>).")


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser: global flags and one sub-parser per verb."""
  parser = _Parser(prog="pod.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_global_flags(parser, with_defaults=True)
  verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

  def verb(name: str, help_text: str) -> argparse.ArgumentParser:
    sub = verbs.add_parser(name, help=help_text, description=help_text)
    _add_global_flags(sub, with_defaults=False)
    return sub

  create = verb("create", "Create a TPU VM, or with --queued a queued resource.")
  create.add_argument("--accelerator", help="Accelerator type, e.g. v5litepod-16 (a v5e-16), v4-32, v6e-8.")
  create.add_argument("--runtime_version",
                      help="TPU software version (default by generation: v2-alpha-tpuv5-lite for v5e, "
                           "v2-alpha-tpuv6e for v6e, v2-alpha-tpuv5 for v5p, tpu-ubuntu2204-base for v2-v4).")
  create.add_argument("--queued", action="store_true",
                      help="Create a queued resource (granted when capacity is free) instead of a VM.")
  billing = create.add_mutually_exclusive_group()
  billing.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, preemptible at any time.")
  billing.add_argument("--reserved", action="store_true", help="Use the project's reservation.")

  setup = verb("setup", "Copy the repo at HEAD to every worker and install it in a venv there.")
  setup.add_argument("--allow_dirty", action="store_true",
                     help="Copy HEAD even though tracked files have uncommitted changes (they are not copied).")
  setup.add_argument("--remote_python", default="python3.11",
                     help="Python on the workers for the venv (installed with apt when missing).")

  launch = verb("launch", "Run `python -m memlm_jax.<module> <args after -->` on every worker, in the background.")
  launch.add_argument("--module", default="train",
                      help="train, eval, infer (memlm_jax.<module>) or any dotted module name.")
  launch.add_argument("--run", help="Run name: the log is ~/memlm_logs/<run>.log on each worker "
                                    "(default: the module's last name).")
  launch.add_argument("--accelerator",
                      help="The slice's accelerator type, to check MODEL_DIR for a multi-worker slice.")

  logs = verb("logs", "Show the end of a run's log.")
  logs.add_argument("--worker", default="0", help="Worker index or 'all' (default 0).")
  logs.add_argument("--lines", type=int, default=50, help="How many lines (default 50).")
  logs.add_argument("--follow", action="store_true", help="Keep printing new lines (Ctrl-C to stop).")
  logs.add_argument("--run", default="latest", help="Run name (default: the last launched).")

  verb("stop", "Kill the run on every worker and free the TPU (processes holding it, the libtpu lock).")

  delete = verb("delete", "Delete the TPU VM, or with --queued the queued resource and its VM.")
  delete.add_argument("--queued", action="store_true", help="It was created with create --queued.")

  status = verb("status", "Describe the TPU VM or, with --queued, the queued resource (its state).")
  status.add_argument("--queued", action="store_true", help="It was created with create --queued.")
  return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Parses and checks `argv` (without the program name); raises UsageError with one line.

  The returned namespace has `passthrough`: the arguments after the first `--`.
  """
  argv = list(argv)
  passthrough = []
  if "--" in argv:
    cut = argv.index("--")
    argv, passthrough = argv[:cut], argv[cut + 1:]
  args = build_parser().parse_args(argv)
  args.passthrough = passthrough
  _check(args)
  return args


def _check(args: argparse.Namespace) -> None:
  if args.passthrough and args.verb != "launch":
    raise UsageError(f"only launch takes arguments after --, got {shlex.join(args.passthrough)!r} for {args.verb}.")
  if args.local is not None:
    if args.local < 1:
      raise UsageError(f"--local must be a number of processes >= 1, got {args.local}.")
    if args.verb not in LOCAL_VERBS:
      raise UsageError(f"--local runs launch and logs on this machine; {args.verb} needs a Cloud TPU (drop --local).")
    if args.local_devices < 1:
      raise UsageError(f"--local_devices must be >= 1, got {args.local_devices}.")
    if args.port is not None and not 0 < args.port < 65536:
      raise UsageError(f"--port must be in 1..65535, got {args.port}.")
    args.name = args.name or "local"
    if not _RUN_NAME.fullmatch(args.name):
      raise UsageError(f"--name {args.name!r} is not a name for the --local log folder: letters, digits, "
                       "'.', '_' and '-'.")
    args.log_dir = args.log_dir or os.path.join("runs", "pod_local", args.name)
  else:
    if not args.name:
      raise UsageError(f"{args.verb} needs --name: the TPU's name, e.g. --name=my-v5e-16.")
    if not _TPU_NAME.fullmatch(args.name):
      raise UsageError(f"--name {args.name!r} is not a TPU name: lowercase letters, digits and '-', "
                       "starting with a letter, at most 63 characters.")
  if args.verb == "create":
    if not args.accelerator:
      raise UsageError("create needs --accelerator: the accelerator type, e.g. --accelerator=v5litepod-16 or v4-32.")
    _generation(args.accelerator)
    if not args.runtime_version:
      args.runtime_version = default_runtime_version(args.accelerator)
  if args.verb == "launch":
    if not args.passthrough:
      raise UsageError("launch needs the launcher's flags after --, e.g. launch -- --gin_file=runs/train.gin "
                       "--gin_file=tiny/infini_lm_demo.gin --gin.MODEL_DIR=\"'gs://BUCKET/run'\".")
    if not _MODULE.fullmatch(args.module):
      raise UsageError(f"--module {args.module!r} is not a module name: train, eval, infer or a dotted name.")
    args.run = args.run or args.module.rsplit(".", 1)[-1]
    if args.accelerator:
      _generation(args.accelerator)
  if args.verb in ("launch", "logs") and not _RUN_NAME.fullmatch(args.run):
    raise UsageError(f"--run {args.run!r} is not a run name: letters, digits, '.', '_' and '-'.")
  if args.verb == "logs":
    if args.worker != "all" and not args.worker.isdigit():
      raise UsageError(f"--worker must be a worker index (0, 1, ...) or 'all', got {args.worker!r}.")
    if args.lines < 1:
      raise UsageError(f"--lines must be >= 1, got {args.lines}.")


def _generation(accelerator: str) -> tuple[str, int]:
  """(generation prefix, number in the type) of an accelerator type such as v4-32."""
  match = _ACCELERATOR.fullmatch(accelerator)
  if accelerator.startswith("v5e-"):
    raise UsageError(f"--accelerator {accelerator!r}: Cloud TPU names v5e slices v5litepod-N, "
                     f"e.g. v5litepod-{accelerator[4:]}.")
  if not match:
    raise UsageError(f"--accelerator {accelerator!r} is not an accelerator type: GENERATION-SIZE, "
                     "e.g. v5litepod-16, v4-32, v6e-8, v5p-16.")
  return match["gen"], int(match["size"])


def default_runtime_version(accelerator: str) -> str:
  """The TPU software version Google recommends for JAX on `accelerator`'s generation."""
  generation, _ = _generation(accelerator)
  if generation not in _GENERATIONS:
    raise UsageError(f"--accelerator {accelerator!r}: no default runtime version for {generation!r} "
                     f"(known: {', '.join(_GENERATIONS)}); pass --runtime_version.")
  return _GENERATIONS[generation][0]


def num_workers(accelerator: str) -> int | None:
  """How many VMs (hosts) a slice of `accelerator` has; None for an unknown generation."""
  generation, size = _generation(accelerator)
  if generation not in _GENERATIONS:
    return None
  _, per_worker, single_worker_max = _GENERATIONS[generation]
  return 1 if size <= single_worker_max else -(-size // per_worker)


def _location(args: argparse.Namespace) -> list[str]:
  return [*([f"--zone={args.zone}"] if args.zone else []), *([f"--project={args.project}"] if args.project else [])]


def _gcloud(group: str, verb: str, args: argparse.Namespace, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", group, verb, args.name, *_location(args), *rest]


def _ssh(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
  return _gcloud("tpu-vm", "ssh", args, f"--worker={worker}", f"--command={command}")


def quote(arg: str) -> str:
  """shlex.quote, except that an argument with single quotes and no $ ` ! \\ " (a gin string such
  as --gin.MODEL_DIR='gs://b/r') gets double quotes: easier to read, and sh and shlex.split read
  it back the same."""
  if "'" in arg and not re.search(r"[$`!\\\"]", arg):
    return f'"{arg}"'
  return shlex.quote(arg)


def join(argv: Sequence[str]) -> str:
  """The shell command line of `argv` (`quote` on each argument)."""
  return " ".join(quote(arg) for arg in argv)


def module_name(module: str) -> str:
  """memlm_jax.train for `train` (likewise eval, infer); any other name unchanged."""
  return f"memlm_jax.{module}" if module in MODULE_SHORTHANDS else module


def python_argv(module: str, flags: Sequence[str], extra: Sequence[str] = (), python: str = "python") -> list[str]:
  """`python -m <module> <extra> <flags>`; `extra` comes first so the user's flags override it."""
  return [python, "-m", module_name(module), *extra, *flags]


def remote_launch_command(module: str, flags: Sequence[str], run: str) -> str:
  """The shell command each worker runs: the launcher in the background (own session, nohup),
  appending to ~/memlm_logs/<run>.log, its pid in ~/memlm_logs/<run>.pid for `stop`."""
  argv = python_argv(module, flags, extra=["--gin.initialize_distributed.mode='always'"])
  log, pid = f"~/{REMOTE_LOGS}/{run}.log", f"~/{REMOTE_LOGS}/{run}.pid"
  return "; ".join([
      "set -e",
      f"cd ~/{REMOTE_DIR}",
      "test -x .venv/bin/python || { echo \"$(hostname): no ~/memlm_jax/.venv: run pod.py setup first\" >&2; exit 1; }",
      f"mkdir -p ~/{REMOTE_LOGS}",
      f"ln -sfn {run}.log ~/{REMOTE_LOGS}/latest.log",
      ". .venv/bin/activate",
      f"setsid nohup {join(argv)} >> {log} 2>&1 < /dev/null & echo $! > {pid}",
      f"echo \"$(hostname): started {run} (pid $!), log {log}\"",
  ])


def remote_setup_command(remote_python: str) -> str:
  """Unpacks the uploaded tarball into ~/memlm_jax and installs it with the `tpu` extra in a venv."""
  py = shlex.quote(remote_python)
  return "; ".join([
      "set -e",
      f"mkdir -p ~/{REMOTE_DIR}",
      f"tar -xzf ~/{REMOTE_TARBALL} -C ~/{REMOTE_DIR}",
      f"rm -f ~/{REMOTE_TARBALL}",
      f"cd ~/{REMOTE_DIR}",
      # TPU VM images ship Python 3.10; the package needs 3.11.
      f"command -v {py} > /dev/null || {{ sudo apt-get update -q && "
      f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q {py} {py}-venv; }}",
      f"test -x .venv/bin/python || {py} -m venv .venv",
      ".venv/bin/python -m pip install -q --upgrade pip",
      ".venv/bin/python -m pip install -q -c constraints.txt -e '.[tpu]'",
      "echo \"$(hostname): ready\"",
  ])


def remote_stop_command() -> str:
  """Kills every run launched by pod.py (whole process groups), then whatever still holds the TPU
  device files, and removes the libtpu lock file, so the next launch gets the chips."""
  return "; ".join([
      f"for f in ~/{REMOTE_LOGS}/*.pid; do [ -e \"$f\" ] && kill -9 -- -\"$(cat \"$f\")\" 2> /dev/null; "
      "rm -f \"$f\"; done",
      "sleep 1",
      "for d in /dev/accel* /dev/vfio/[0-9]*; do [ -e \"$d\" ] && sudo lsof -t \"$d\"; done 2> /dev/null "
      "| sort -u | xargs -r sudo kill -9",
      f"sudo rm -f {LIBTPU_LOCKFILE}",
      "echo \"$(hostname): stopped\"",
  ])


def remote_logs_command(run: str, lines: int, follow: bool, prefix_host: bool) -> str:
  """`tail` of ~/memlm_logs/<run>.log; each line prefixed with the worker's host name when several print."""
  tail = f"tail -n {lines}{' -F' if follow else ''} ~/{REMOTE_LOGS}/{run}.log"
  return f"{tail} | sed -u \"s/^/[$(hostname)] /\"" if prefix_host else tail


def tarball_path(name: str) -> str:
  """Where setup writes the `git archive` of HEAD before copying it to the workers."""
  return os.path.join(tempfile.gettempdir(), f"memlm_jax_{name}.tar.gz")


def commands_for(args: argparse.Namespace) -> list[list[str]]:
  """The commands a (non --local) verb runs, in order: gcloud argv lists (and setup's git archive)."""
  if args.verb == "create":
    billing = ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
    if args.queued:
      return [_gcloud("queued-resources", "create", args, f"--node-id={args.name}",
                      f"--accelerator-type={args.accelerator}", f"--runtime-version={args.runtime_version}", *billing)]
    return [_gcloud("tpu-vm", "create", args, f"--accelerator-type={args.accelerator}",
                    f"--version={args.runtime_version}", *billing)]
  if args.verb == "setup":
    tarball = tarball_path(args.name)
    return [["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
            ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:{REMOTE_TARBALL}",
             *_location(args), "--worker=all"],
            _ssh(args, remote_setup_command(args.remote_python))]
  if args.verb == "launch":
    return [_ssh(args, remote_launch_command(args.module, args.passthrough, args.run))]
  if args.verb == "logs":
    return [_ssh(args, remote_logs_command(args.run, args.lines, args.follow, args.worker == "all"), args.worker)]
  if args.verb == "stop":
    return [_ssh(args, remote_stop_command())]
  if args.verb == "delete":
    if args.queued:
      return [_gcloud("queued-resources", "delete", args, "--force", "--quiet")]
    return [_gcloud("tpu-vm", "delete", args, "--quiet")]
  if args.verb == "status":
    return [_gcloud("queued-resources" if args.queued else "tpu-vm", "describe", args)]
  raise UsageError(f"unknown verb {args.verb!r}; expected one of {', '.join(VERBS)}.")


def model_dir_flag(flags: Sequence[str]) -> str | None:
  """The MODEL_DIR the launcher flags bind (the last binding wins), unquoted; None when unset."""
  value = None
  for i, flag in enumerate(flags):
    if flag.startswith("--gin.MODEL_DIR="):
      value = flag.split("=", 1)[1]
    elif flag == "--gin.MODEL_DIR" and i + 1 < len(flags):
      value = flags[i + 1]
    elif flag.startswith("--gin_bindings=") and re.match(r"\s*MODEL_DIR\s*=", flag[len("--gin_bindings="):]):
      value = flag.split("=", 2)[2]
  return None if value is None else value.strip().strip("'\"")


def model_dir_warning(flags: Sequence[str], accelerator: str | None) -> str | None:
  """A warning when MODEL_DIR is not on gs:// while the slice has (or may have) several workers."""
  directory = model_dir_flag(flags)
  if directory is None or directory.startswith("gs://"):
    return None
  workers = num_workers(accelerator) if accelerator else None
  if workers == 1:
    return None
  slice_text = f"a {accelerator} has {workers} workers" if workers else "on a slice with several workers"
  return (f"warning: MODEL_DIR {directory!r} is not a gs:// path: {slice_text}, each would write its own local "
          "checkpoint files and a new VM could not resume from them; use --gin.MODEL_DIR=\"'gs://BUCKET/DIR'\".")


def free_port() -> int:
  """A TCP port no one listens on now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def local_commands(args: argparse.Namespace, port: int, base_env: dict[str, str] | None = None,
                   python: str = sys.executable) -> list[tuple[dict[str, str], list[str]]]:
  """(environment variables to set, argv) of each --local process: process i of N on CPU devices,
  all meeting at the coordinator 127.0.0.1:<port>."""
  base_env = os.environ if base_env is None else base_env
  inherited = re.sub(r"--xla_force_host_platform_device_count=\S*", "", base_env.get("XLA_FLAGS", "")).split()
  xla_flags = " ".join([*inherited, f"--xla_force_host_platform_device_count={args.local_devices}"])
  commands = []
  for i in range(args.local):
    extra = [f"--gin.initialize_distributed.coordinator_address='127.0.0.1:{port}'",
             f"--gin.initialize_distributed.num_processes={args.local}",
             f"--gin.initialize_distributed.process_id={i}"]
    env = {"XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    commands.append((env, python_argv(args.module, args.passthrough, extra=extra, python=python)))
  return commands


def _env_command(env: dict[str, str], argv: Sequence[str]) -> str:
  return join(["env", *(f"{k}={v}" for k, v in env.items()), *argv])


def _log_tail(path: str, lines: int = LOG_TAIL_LINES) -> list[str]:
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 64 * 1024))
      text = f.read().decode("utf-8", errors="replace")
  except OSError as error:
    return [f"(could not read the log: {error})"]
  return text.splitlines()[-lines:]


def _die_with_parent() -> None:
  # Runs in the child between fork and exec: if the launcher is killed outright (SIGKILL, where
  # no handler runs), the kernel still kills the worker instead of leaving it orphaned.
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_local(args: argparse.Namespace) -> int:
  """Runs `launch` as args.local processes, echoes worker 0's log, and waits for all of them.

  A worker that exits non-zero stops the others (each worker's whole process group); so do
  Ctrl-C, SIGTERM and SIGHUP to the launcher. Returns the exit code for the launcher.
  """
  port = args.port or free_port()
  commands = local_commands(args, port)
  os.makedirs(args.log_dir, exist_ok=True)
  log_paths = [os.path.join(args.log_dir, f"worker_{i}.log") for i in range(len(commands))]
  stop_signal = []

  def on_signal(signum, frame):
    del frame
    stop_signal.append(signum)

  handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
  previous = {s: signal.signal(s, on_signal) for s in handled}
  procs: list[subprocess.Popen] = []
  echo = None
  try:
    for (env, argv), path in zip(commands, log_paths):
      if stop_signal:
        break
      with open(path, "wb") as log:
        procs.append(subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent))
      print(f"worker {len(procs) - 1}: pid {procs[-1].pid}, log {path}", file=sys.stderr)
    print(f"{len(procs)} workers, coordinator 127.0.0.1:{port}; worker 0's log follows.", file=sys.stderr)
    echo = open(log_paths[0], "rb")  # pylint: disable=consider-using-with
    while True:
      _echo(echo)
      if stop_signal:
        print(f"\n{signal.Signals(stop_signal[0]).name}: stopping all workers.", file=sys.stderr)
        return 128 + stop_signal[0]
      codes = [p.poll() for p in procs]
      failed = [i for i, code in enumerate(codes) if code]
      if failed:
        i = failed[0]
        _kill_all(procs)
        _echo(echo)
        reason = f"was killed by {signal.Signals(-codes[i]).name}" if codes[i] < 0 else f"exited with code {codes[i]}"
        tail = "\n".join("  " + line for line in _log_tail(log_paths[i]))
        print(f"error: worker {i} of {len(procs)} {reason}; stopped the others. "
              f"Last lines of {log_paths[i]}:\n{tail}", file=sys.stderr)
        return codes[i] if codes[i] > 0 else 1
      if all(code == 0 for code in codes):
        _echo(echo)
        print(f"all {len(procs)} workers finished; logs in {args.log_dir}", file=sys.stderr)
        return 0
      time.sleep(0.1)
  finally:
    _kill_all(procs)
    if echo:
      echo.close()
    for s, handler in previous.items():
      signal.signal(s, handler)


def _echo(log) -> None:
  chunk = log.read()
  if chunk:
    sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


def _kill_all(procs: Sequence[subprocess.Popen]) -> None:
  """SIGKILL to each worker's process group (its children too), then reaps the workers."""
  for proc in procs:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
  for proc in procs:
    proc.wait()


def local_logs_command(args: argparse.Namespace) -> list[str]:
  """`tail` over the --local log files of one worker or all."""
  if args.worker == "all":
    names = sorted((f for f in os.listdir(args.log_dir) if re.fullmatch(r"worker_\d+\.log", f)),
                   key=lambda f: int(f[7:-4])) if os.path.isdir(args.log_dir) else []
  else:
    names = [f"worker_{args.worker}.log"]
  paths = [os.path.join(args.log_dir, n) for n in names]
  if not args.dry_run and (not paths or not all(os.path.isfile(p) for p in paths)):
    raise UsageError(f"no log {paths[0] if paths else 'worker_*.log'} in {args.log_dir!r}; "
                     "run --local N launch first (or pass the --log_dir it used).")
  return ["tail", "-n", str(args.lines), *(["-F"] if args.follow else []), *paths]


def dirty_files(repo: str = REPO_ROOT) -> list[str]:
  """Tracked files with uncommitted changes (staged or not) in the git work tree `repo`."""
  try:
    out = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True, check=False)
  except OSError as error:
    raise UsageError(f"setup copies the git commit HEAD but git did not run: {error}.") from None
  if out.returncode:
    raise UsageError(f"setup copies the git commit HEAD, but {repo!r} is not a git work tree: "
                     f"{out.stderr.strip() or 'git status failed'}.")
  return [line[3:] for line in out.stdout.splitlines() if line.strip()]


def _run(commands: Sequence[Sequence[str]]) -> int:
  for command in commands:
    print(f"$ {shlex.join(command)}", file=sys.stderr)
    try:
      code = subprocess.run(list(command), check=False).returncode
    except FileNotFoundError:
      print(f"error: {command[0]} not found; install it (gcloud: https://cloud.google.com/sdk/docs/install).",
            file=sys.stderr)
      return 1
    except KeyboardInterrupt:
      return 130
    if code:
      print(f"error: {command[0]} exited with code {code}: {shlex.join(command)[:200]}", file=sys.stderr)
      return code
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one verb; returns the exit code (2 for a usage error, before anything runs)."""
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.verb == "setup" and not args.allow_dirty:
      dirty = dirty_files()
      if dirty:
        shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
        raise UsageError(f"{len(dirty)} tracked file(s) have uncommitted changes ({shown}); setup copies the "
                         "commit HEAD, so the workers would not get them: commit them, or pass --allow_dirty.")
    if args.local is not None:
      if args.verb == "logs":
        command = local_logs_command(args)
        if args.dry_run:
          print(shlex.join(command))
          return 0
        return _run([command])
      if args.dry_run:
        for env, command in local_commands(args, args.port or free_port()):
          print(_env_command(env, command))
        return 0
      return run_local(args)
    commands = commands_for(args)
  except UsageError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  if args.verb == "launch":
    warning = model_dir_warning(args.passthrough, args.accelerator)
    if warning:
      print(warning, file=sys.stderr)
  if args.dry_run:
    for command in commands:
      print(shlex.join(command))
    return 0
  code = _run(commands)
  if args.verb == "setup" and os.path.exists(tarball_path(args.name)):
    os.remove(tarball_path(args.name))
  if code == 0 and args.verb in ("create", "launch"):
    pod = shlex.join(["python", "tpu/pod.py", f"--name={args.name}", *_location(args)])
    if args.verb == "launch":
      print(f"follow worker 0: {pod} logs --follow", file=sys.stderr)
    elif args.queued:
      print(f"next: once `{pod} status --queued` says state: ACTIVE, {pod} setup", file=sys.stderr)
    else:
      print(f"next: {pod} setup", file=sys.stderr)
  return code


if __name__ == "__main__":
  sys.exit(main())
