"""t5x-style gin flags for the launchers: --gin_file, --gin_bindings, --gin_search_paths
and the `--gin.NAME=value` shorthand, with one-line errors for bad configs."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tokenize
from typing import Any, Callable, Sequence

import gin
from absl import flags

from memlm_jax.runtime import files

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files, parsed in order (searched in --gin_search_paths).")
GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files.")
QUIET = flags.DEFINE_bool("quiet", False, "Show only progress lines and results on the terminal; the full absl log "
                          "goes to MODEL_DIR/logs/ (for a gs:// MODEL_DIR, to --log_dir or the temp directory).")
CONFIG_DIR = os.path.join(_REPO_ROOT, "configs")
GIN_SEARCH_PATHS = flags.DEFINE_list("gin_search_paths", [CONFIG_DIR, ".", _REPO_ROOT],
                                     "Directories searched for --gin_file and gin `include`s.")


class GinConfigError(ValueError):
  """A gin file or binding is wrong; the message is one line naming it."""


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.NAME=value` (or `--gin.NAME value`) -> `--gin_bindings=NAME = value`."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--gin.") and arg != "--gin.":
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        if i + 1 >= len(argv):
          raise GinConfigError(f"{arg} has no value; write --gin.{name}=VALUE.")
        value, i = argv[i + 1], i + 1
      out.append(f"--gin_bindings={name} = {value}")
    else:
      out.append(arg)
    i += 1
  return out


def _find(path: str, search_paths: Sequence[str]) -> str:
  candidates = [path] if os.path.isabs(path) else [os.path.join(d, path) for d in search_paths]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise GinConfigError(f"gin file {path!r} not found (searched {list(dict.fromkeys(search_paths))}).")


def _one_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  reason = lines[0] if lines else type(error).__name__
  if isinstance(error, SyntaxError) and getattr(error, "filename", None):
    return f"{reason} in {error.filename!r}: {(error.text or '').strip()!r}"
  if len(lines) >= 3 and lines[1].startswith("In "):
    where = lines[1][3:].replace("bindings string", "--gin_bindings/--gin.X")
    return f"{reason} ({where}: {lines[2]!r})"
  return reason


def parse_gin(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]) -> None:
  """Parses gin files then bindings; raises GinConfigError with a one-line message."""
  for path in search_paths:
    gin.add_config_file_search_path(path)
  resolved = [_find(f, search_paths) for f in files]
  for binding in bindings:  # syntax first, so a slip names its flag
    _check_binding_syntax(binding)
  try:
    gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=True)
  except (ValueError, SyntaxError, OSError, TypeError, KeyError, tokenize.TokenError) as error:
    raise GinConfigError("Gin config error: " + _one_line(error)) from None


def _check_binding_syntax(binding: str) -> None:
  """GinConfigError naming the flag when one binding does not parse on its own."""
  name, _, value = (part.strip() for part in binding.partition("="))
  flag = f"--gin.{name}={value}"
  try:
    for _ in gin.config_parser.ConfigParser(binding, gin.config.ParserDelegate(skip_unknown=True)):
      pass
  except tokenize.TokenError:
    raise GinConfigError(f"Gin config error: {flag}: unbalanced brackets or an unterminated string in "
                         f"{value!r}.") from None
  except (ValueError, SyntaxError) as error:
    if re.fullmatch(r"[\w./~-]+", value) and not re.fullmatch(r"-?[\d.]+(e-?\d+)?|True|False|None", value):
      raise GinConfigError(f"Gin config error: {flag}: {value!r} is not a gin value; a string needs quotes "
                           f"inside the shell's: --gin.{name}=\"'{value}'\".") from None
    raise GinConfigError(f"Gin config error: {flag}: {_one_line(error)}") from None


def read_binding(gin_file: str, name: str, search_paths: Sequence[str] = (CONFIG_DIR,)) -> Any:
  """The value `gin_file` binds to `name` (e.g. 'Partitioner.logical_axis_rules'), read without
  touching the global gin config (for scripts and tests that build objects directly)."""
  path = _find(gin_file, search_paths)
  with open(path) as f:
    parser = gin.config_parser.ConfigParser(f.read(), gin.config.ParserDelegate(skip_unknown=True))
    for statement in parser:
      if isinstance(statement, gin.config_parser.BindingStatement):
        if f"{statement.selector}.{statement.arg_name}" == name:
          return statement.value
  raise GinConfigError(f"{path} does not bind {name!r}.")


def _value_text(value: Any) -> str:
  if hasattr(value, "selector") and hasattr(value, "evaluate"):  # a configurable reference
    return f"@{value.selector}{'()' if value.evaluate else ''}"
  if isinstance(value, (list, tuple)):
    inner = ", ".join(_value_text(v) for v in value)
    return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{_value_text(k)}: {_value_text(v)}" for k, v in value.items()) + "}"
  return repr(value)


def config_bindings(text: str) -> dict[str, str]:
  """{'scope/Selector.param' or 'MACRO': value as text} of a gin config (e.g. an operative config)."""
  parser = gin.config_parser.ConfigParser(text, gin.config.ParserDelegate(skip_unknown=True))
  bindings = {}
  for statement in parser:
    if isinstance(statement, gin.config_parser.BindingStatement):
      name = statement.selector if not statement.arg_name else f"{statement.selector}.{statement.arg_name}"
      bindings[f"{statement.scope}/{name}" if statement.scope else name] = _value_text(statement.value)
  return bindings


def differing_bindings(saved_text: str, current_text: str, limit: int = 8) -> list[str]:
  """'name: saved -> current' for each binding two configs both set to different values (the
  first `limit`, then a count)."""
  saved, current = config_bindings(saved_text), config_bindings(current_text)
  changed = [f"{name}: {saved[name]} -> {current[name]}" for name in sorted(set(saved) & set(current))
             if saved[name] != current[name]]
  return changed[:limit] + ([f"and {len(changed) - limit} more"] if len(changed) > limit else [])


def explain_config_change(model_dir: str) -> str:
  """What differs between MODEL_DIR/operative_config.gin (the config its checkpoints were trained
  with) and the config of this process, as one sentence for an error message."""
  path = os.path.join(model_dir, "operative_config.gin")
  try:
    saved = files.read_text(path)
  except (FileNotFoundError, IsADirectoryError):
    return f"({path} is missing, so the configs cannot be compared)"
  except OSError as error:
    return f"({path} could not be read: {error})"
  try:
    changed = differing_bindings(saved, gin.operative_config_str() + "\n" + gin.config_str())
  except (ValueError, SyntaxError) as error:
    return f"({path} could not be parsed: {error})"
  if not changed:
    return f"(no binding differs from {path}; a default or a gin file's include may have changed)"
  return f"Bindings that differ from {path} (saved -> now): " + "; ".join(changed) + "."


def restore_or_explain(restore: Callable[[], Any], model_dir: str) -> Any:
  """`restore()`, with a CheckpointMismatchError extended by the gin bindings that differ from the
  config MODEL_DIR was trained with."""
  from memlm_jax.runtime.checkpoints import CheckpointMismatchError  # pylint: disable=g-import-not-at-top
  try:
    return restore()
  except CheckpointMismatchError as error:
    raise CheckpointMismatchError(f"{error} {explain_config_change(model_dir)} Nothing in {model_dir} was "
                                  "changed.") from None


def parse_flags_and_gin() -> None:
  """Parses the gin flags of the current process; exits with a one-line error on failure."""
  try:
    parse_gin(GIN_FILES.value, GIN_BINDINGS.value, GIN_SEARCH_PATHS.value)
  except GinConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def model_dir() -> str:
  """The MODEL_DIR macro; exits with a one-line error when it is not set."""
  try:
    value = gin.query_parameter("%MODEL_DIR")
  except ValueError:
    value = None
  if not isinstance(value, str) or not value:
    print("error: MODEL_DIR is not set; pass --gin.MODEL_DIR=\"'path/to/dir'\".", file=sys.stderr)
    sys.exit(2)
  return value


@contextlib.contextmanager
def one_line_gin_errors():
  """Turns gin's missing-REQUIRED-binding error (raised when a configurable is called,
  before any compilation) into a one-line message and exit code 2."""
  try:
    yield
  except RuntimeError as error:
    if "Required bindings" not in str(error) and "gin.REQUIRED" not in str(error):
      raise
    print(f"error: Gin config error: {_one_line(error)}", file=sys.stderr)
    sys.exit(2)


def exit_with_error(error: Exception, code: int = 1) -> None:
  """Logs the traceback, prints one line `error: ...` (gin's call chain folded in) and exits."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.vlog(1, "Stopping on error", exc_info=error)
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  message = re.sub(r" \(<[^>]* at 0x[0-9a-f]+>\)", "", " ".join(lines))
  print(f"error: {type(error).__name__}: {message}", file=sys.stderr)
  sys.exit(code)


def write_config(model_dir: str, name: str, text: str) -> None:
  """Writes MODEL_DIR/`name` (e.g. operative_config.gin) atomically; MODEL_DIR may be gs://."""
  files.write_atomic(os.path.join(model_dir, name), text)


def run_launcher(run_fn: Callable[[str], Any], *, on_result: Callable[[Any], None] = print,
                 user_errors: tuple = ()) -> None:
  """The body every launcher shares: parse gin flags, find MODEL_DIR, call
  `run_fn(model_dir)` with one-line errors, hand the result to `on_result`."""
  from absl import app  # pylint: disable=g-import-not-at-top

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    parse_flags_and_gin()
    directory = model_dir()
    if QUIET.value:
      log_to_model_dir(directory)
    try:
      with one_line_gin_errors():
        result = run_fn(directory)
    except (ValueError, OSError, *user_errors) as error:
      exit_with_error(error)
    on_result(result)

  run(main)


def log_to_model_dir(directory: str) -> None:
  """Sends the absl log to MODEL_DIR/logs/<program>.* and turns the terminal progress line on. absl
  writes only local files: for a gs:// MODEL_DIR the log goes to absl's own --log_dir (or the temp
  directory)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from memlm_jax.runtime import progress  # pylint: disable=g-import-not-at-top
  log_dir = None
  if files.is_local(directory):
    log_dir = os.path.join(directory, "logs")
    os.makedirs(log_dir, exist_ok=True)
  logging.get_absl_handler().use_absl_log_file(os.path.basename(sys.argv[0]).removesuffix(".py"), log_dir)
  progress.enable()


def run(main, argv: Sequence[str] | None = None) -> None:
  """absl `app.run(main)` after rewriting `--gin.X=Y` flags."""
  from absl import app  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  try:
    argv = rewrite_gin_args(argv)
  except GinConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  app.call_after_init(quiet_library_logs)
  app.run(main, argv=argv)


class _DropChattyInfo:
  """Drops orbax's per-file INFO records and gin's 'Path not found' while it walks the
  search paths (it reports a file that is truly missing itself)."""

  def filter(self, record) -> bool:
    if "resource_reader" in record.pathname and "Path not found" in str(record.msg):
      return False
    return record.levelno > 20 or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(_DropChattyInfo())
  py_logging.getLogger("absl").addFilter(_DropChattyInfo())
