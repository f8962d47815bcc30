"""One updating status line on the terminal, for launchers run with --quiet.

With --quiet the absl log goes to MODEL_DIR/logs/ and the terminal shows only what a person
running `make demo` wants: a line per stage that updates in place (steps, loss, steps/s,
ETA; tokens streamed), the lines that stay (results), errors. Without --quiet every call
here does nothing and the absl log on stderr says it all.
"""

from __future__ import annotations

import sys
import time

_state = {"enabled": False, "open": False, "last_plain": 0.0}
PLAIN_INTERVAL_S = 30.0  # when stdout is not a terminal (CI logs), at most one update line per interval


def enable(on: bool = True) -> None:
  _state["enabled"] = on


def enabled() -> bool:
  return _state["enabled"]


def update(text: str, *, force: bool = False) -> None:
  """Replaces the status line with `text` (on a non-terminal: prints it at most every 30 s)."""
  if not _state["enabled"]:
    return
  if sys.stdout.isatty():
    sys.stdout.write("\r\033[K" + text)
    _state["open"] = True
  elif force or time.time() - _state["last_plain"] >= PLAIN_INTERVAL_S:
    sys.stdout.write(text + "\n")
    _state["last_plain"] = time.time()
  sys.stdout.flush()


def done(text: str) -> None:
  """Ends the status line with `text`, which stays."""
  if not _state["enabled"]:
    return
  prefix = "\r\033[K" if _state["open"] and sys.stdout.isatty() else ""
  sys.stdout.write(prefix + text + "\n")
  sys.stdout.flush()
  _state["open"] = False


def format_duration(seconds: float) -> str:
  seconds = max(int(seconds), 0)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
