"""Passkey retrieval report: Infini-attention Table 3 layout, and a length x depth heatmap.

Reads the JSON the passkey eval writes (one file per model/checkpoint):

  {"model": str, "step": int | null, "metric_note": str (optional),
   "summary": [{"length", "bucket", "examples", "status", "exact_match", "token_accuracy",
                "reason" (optional)}, ...],          # one per (length, bucket)
   "results": [{"length", "depth", "bucket", "key", "predicted", "exact_match",
                "token_accuracy"}, ...]}             # one per example

Buckets are the thirds of the input the needle sits in: start [0, 1/3), middle [1/3, 2/3),
end [2/3, 1]. Summary entries with status "ok" carry both metrics as fractions in [0, 1];
any other status (e.g. "exceeds_context") is reported as n/a with its reason, never dropped.

The table (passkey_table) is built from "summary"; the heatmap (passkey_heatmap) from the
per-example "results", with the summary's statuses marking the cells that were not run.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import re
from typing import Any, Mapping, Sequence, Union

from memlm_jax.runtime import files

BUCKETS = ("start", "middle", "end")
METRICS = ("exact_match", "token_accuracy")
METRIC_NAMES = {"exact_match": "exact match", "token_accuracy": "token accuracy"}

_K = 1024
PAPER_LENGTHS = (32 * _K, 128 * _K, 256 * _K, 512 * _K, 1024 * _K)

# Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143) Table 3, transcribed by hand
# from the paper: token-level passkey retrieval accuracy (%), (start, middle, end) per
# length in PAPER_LENGTHS (32K, 128K, 256K, 512K, 1M); "FT (400 steps)" = after 400 steps
# of passkey fine-tuning, "Zero-shot" = without it.
PAPER_TABLE3 = (
    ("Zero-shot", "Infini-Transformer (Linear)",
     ((14, 13, 98), (11, 14, 100), (6, 3, 100), (6, 7, 99), (8, 6, 98))),
    ("Zero-shot", "Infini-Transformer (Linear + Delta)",
     ((13, 11, 99), (6, 9, 99), (7, 5, 99), (6, 8, 97), (7, 6, 97))),
    ("FT (400 steps)", "Infini-Transformer (Linear)",
     ((100, 100, 100), (100, 100, 100), (100, 100, 100), (97, 99, 100), (96, 94, 100))),
    ("FT (400 steps)", "Infini-Transformer (Linear + Delta)",
     ((100, 100, 100),) * 5),
)

# Heatmap depth axis: DEPTH_BINS equal bins when every evaluated length has at least
# MIN_EXAMPLES_PER_BIN examples per bin on average, otherwise the 3 paper buckets.
DEPTH_BINS = 10
MIN_EXAMPLES_PER_BIN = 3

Results = Mapping[str, Any]

_TOP_KEYS = ("model", "step", "summary", "results")
_SUMMARY_KEYS = ("length", "bucket", "examples", "status")
_OK_KEYS = METRICS
_EXAMPLE_KEYS = ("length", "depth") + METRICS


# ---------------------------------------------------------------------------- loading


def validate_results(data: Any, source: str = "results") -> Results:
  """Checks `data` against the passkey results schema; returns it. ValueError names the key."""
  if not isinstance(data, Mapping):
    raise ValueError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}.")
  for key in _TOP_KEYS:
    if key not in data:
      raise ValueError(f"{source}: missing key '{key}' (need {', '.join(_TOP_KEYS)}).")
  for key in ("summary", "results"):
    if not isinstance(data[key], list):
      raise ValueError(f"{source}: '{key}' must be a list, got {type(data[key]).__name__}.")
  seen = set()
  for i, entry in enumerate(data["summary"]):
    where = f"{source}: summary[{i}]"
    required = _SUMMARY_KEYS + (_OK_KEYS if isinstance(entry, Mapping) and entry.get("status") == "ok" else ())
    _check_entry(entry, required, where)
    if entry["bucket"] not in BUCKETS:
      raise ValueError(f"{where}: 'bucket' must be one of {BUCKETS}, got {entry['bucket']!r}.")
    if (entry["length"], entry["bucket"]) in seen:
      raise ValueError(f"{where}: a second entry for length {entry['length']}, bucket '{entry['bucket']}'.")
    seen.add((entry["length"], entry["bucket"]))
  for i, example in enumerate(data["results"]):
    where = f"{source}: results[{i}]"
    _check_entry(example, _EXAMPLE_KEYS, where)
    if not 0.0 <= example["depth"] <= 1.0:
      raise ValueError(f"{where}: 'depth' must be in [0, 1], got {example['depth']}.")
  return data


def _check_entry(entry: Any, required: Sequence[str], where: str) -> None:
  if not isinstance(entry, Mapping):
    raise ValueError(f"{where}: expected an object, got {type(entry).__name__}.")
  for key in required:
    if key not in entry:
      raise ValueError(f"{where}: missing key '{key}'.")
  length = entry["length"]
  if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
    raise ValueError(f"{where}: 'length' must be a positive integer, got {length!r}.")
  for key in METRICS:  # a summary entry with no examples may carry NaN (shown as '-')
    if key in entry and entry.get("examples") != 0 and not _is_fraction(entry[key]):
      raise ValueError(f"{where}: '{key}' must be a number in [0, 1], got {entry[key]!r}.")


def _is_fraction(value: Any) -> bool:
  return isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def latest_results_path(path: str) -> str:
  """`path` itself, or for a model directory its newest eval/passkey_<hash>_step<N>.json: the
  highest step, a complete eval before a partial one, then the most recently written."""
  if not files.isdir(path):
    return path
  eval_dir = os.path.join(path, "eval")
  found = []
  for name in files.listdir(eval_dir) if files.isdir(eval_dir) else []:
    match = re.fullmatch(r"passkey_(?:[0-9a-f]+_)?step(\d+)\.json", name)
    if match:
      file = os.path.join(eval_dir, name)
      try:
        complete = json.loads(files.read_text(file)).get("complete", True) is not False
      except (OSError, ValueError, AttributeError):
        complete = False
      found.append((int(match.group(1)), complete, files.getmtime(file), file))
  if not found:
    raise ValueError(f"{path} is a directory with no eval/passkey_<hash>_step<N>.json; run the passkey eval first.")
  return max(found)[3]


def load_results(path: str) -> Results:
  """Reads one passkey results JSON (or a model directory's newest one); ValueError naming the file
  (and key) if it is malformed."""
  path = latest_results_path(path)
  text = files.read_text(path)
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}).") from e
  return validate_results(data, source=path)


# ---------------------------------------------------------------------------- table


def length_label(length: int) -> str:
  """Tokens in 1024 multiples: 2048 -> '2K', 1048576 -> '1M', 1536 -> '1.5K', 1000 -> '1000'."""
  for unit, suffix in ((_K * _K, "M"), (_K, "K")):
    if length >= unit and (length * 10) % unit == 0:
      return f"{length / unit:g}{suffix}"
  return str(length)


def _percent(fraction: float) -> int:
  """Rounded half up, as the paper's integer percentages (2/3 -> 67)."""
  return int(math.floor(100.0 * fraction + 0.5))


def _status_text(status: str) -> str:
  return str(status).replace("_", " ")


def format_cell(by_bucket: Mapping[str, Mapping[str, Any]], metric: str = "exact_match") -> str:
  """'start/middle/end' in % from one length's summary entries (keyed by bucket).

  Missing buckets (or 'ok' with no examples) show '-'; a status other than 'ok' shows
  'n/a (status)' when it covers all three buckets, else 'n/a' in place plus the bucket's status.
  """
  if not by_bucket:
    return "-"
  parts, off = [], []
  for bucket in BUCKETS:
    entry = by_bucket.get(bucket)
    if entry is None or (entry["status"] == "ok" and not entry["examples"]):
      parts.append("-")
    elif entry["status"] != "ok":
      parts.append("n/a")
      off.append((bucket, _status_text(entry["status"])))
    else:
      parts.append(str(_percent(entry[metric])))
  if len(off) == len(BUCKETS) and len({status for _, status in off}) == 1:
    return f"n/a ({off[0][1]})"
  cell = "/".join(parts)
  if off:
    cell += " (" + ", ".join(f"{bucket}: {status}" for bucket, status in off) + ")"
  return cell


def _by_length(data: Results) -> dict[int, dict[str, Mapping[str, Any]]]:
  table: dict[int, dict[str, Mapping[str, Any]]] = collections.defaultdict(dict)
  for entry in data["summary"]:
    table[entry["length"]][entry["bucket"]] = entry
  return table


def _as_list(results: Union[Results, Sequence[Results]]) -> list[Results]:
  items = [results] if isinstance(results, Mapping) else list(results)
  if not items:
    raise ValueError("no passkey results given.")
  return [validate_results(r, source=f"results[{i}]") for i, r in enumerate(items)]


def _row_labels(items: Sequence[Results]) -> list[str]:
  """The 'model' labels; repeated ones get '@ step N' so rows stay apart."""
  counts = collections.Counter(str(r["model"]) for r in items)
  return [f"{r['model']} @ step {r['step']}" if counts[str(r["model"])] > 1 else str(r["model"]) for r in items]


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """Markdown table with columns padded to the widest cell."""
  columns = list(zip(header, *rows))
  widths = [max(len(str(cell)) for cell in column) for column in columns]

  def render(cells):
    return "| " + " | ".join(f"{cell!s:<{width}}" for cell, width in zip(cells, widths)) + " |"

  rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
  return "\n".join([render(header), rule] + [render(row) for row in rows])


def ours_table(results: Union[Results, Sequence[Results]],
               metric: str = "exact_match") -> tuple[list[str], list[list[str]]]:
  """(header, rows) for our models: Model, Step, then one 'start/middle/end' column per length."""
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
  items = _as_list(results)
  per_model = [_by_length(r) for r in items]
  lengths = sorted({length for table in per_model for length in table})
  header = ["Model", "Step"] + [length_label(n) for n in lengths]
  rows = []
  for label, data, table in zip(_row_labels(items), items, per_model):
    step = "-" if data["step"] is None else str(data["step"])
    rows.append([label, step] + [format_cell(table.get(n, {}), metric) for n in lengths])
  return header, rows


def paper_table() -> tuple[list[str], list[list[str]]]:
  """(header, rows) of PAPER_TABLE3."""
  header = ["Setting", "Model (paper)"] + [length_label(n) for n in PAPER_LENGTHS]
  rows = [[setting, model] + ["/".join(str(v) for v in cell) for cell in cells]
          for setting, model, cells in PAPER_TABLE3]
  return header, rows


def _notes(items: Sequence[Results], labels: Sequence[str]) -> list[str]:
  lines = []
  for label, data in zip(labels, items):
    if data.get("metric_note"):
      lines.append(f"note ({label}): {data['metric_note']}")
    off: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for entry in data["summary"]:
      if entry["status"] != "ok":
        key = (str(entry["status"]), str(entry.get("reason", "")))
        if entry["length"] not in off[key]:
          off[key].append(entry["length"])
    for (status, reason), lengths in off.items():
      where = ", ".join(length_label(n) for n in sorted(lengths))
      lines.append(f"n/a ({label}) at {where}: {_status_text(status)}" + (f" - {reason}" if reason else ""))
  return lines


def passkey_table(results: Union[Results, Sequence[Results]], metric: str = "exact_match",
                  paper: bool = True) -> str:
  """Table-3-shaped text: our models' start/middle/end % per length, notes, then the paper's rows."""
  items = _as_list(results)
  header, rows = ours_table(items, metric)
  out = [f"Passkey retrieval, {METRIC_NAMES[metric]} (%), cells start/middle/end "
         f"(needle in the first / middle / last third of the input)", markdown(header, rows)]
  notes = _notes(items, _row_labels(items))
  if notes:
    out += [""] + notes
  if paper:
    paper_header, paper_rows = paper_table()
    out += ["", "Paper: Infini-attention (arXiv 2404.07143) Table 3, token-level retrieval accuracy (%), "
            "start/middle/end", markdown(paper_header, paper_rows)]
    if metric != "token_accuracy":
      out.append(f"(the paper's metric is token-level accuracy; ours above is {METRIC_NAMES[metric]}: "
                 "compare token accuracy (--metric token_accuracy) like for like)")
  return "\n".join(out)


# ---------------------------------------------------------------------------- heatmap


def _depth_bin(depth: float, bins: int) -> int:
  return min(int(depth * bins), bins - 1)


def choose_depth_bins(results: Union[Results, Sequence[Results]]) -> int:
  """DEPTH_BINS if each evaluated length (of every model) has >= MIN_EXAMPLES_PER_BIN * DEPTH_BINS
  examples, else 3 (the paper's buckets, which equal 3 equal depth bins)."""
  counts = collections.Counter()
  for index, data in enumerate(_as_list(results)):
    counts.update((index, example["length"]) for example in data["results"])
  if counts and min(counts.values()) >= MIN_EXAMPLES_PER_BIN * DEPTH_BINS:
    return DEPTH_BINS
  return len(BUCKETS)


def _depth_labels(bins: int) -> list[str]:
  if bins == len(BUCKETS):
    return [f"{name}\n{span}" for name, span in zip(BUCKETS, ("[0, 1/3)", "[1/3, 2/3)", "[2/3, 1]"))]
  return [f"{i / bins:.2g}-{(i + 1) / bins:.2g}" for i in range(bins)]


def _grid(data: Results, lengths: Sequence[int], bins: int, metric: str):
  """Per (bin, length): mean metric and count over examples, and the summary status of its bucket."""
  sums = collections.defaultdict(float)
  counts = collections.Counter()
  for example in data["results"]:
    cell = (_depth_bin(example["depth"], bins), example["length"])
    sums[cell] += float(example[metric])
    counts[cell] += 1
  by_length = _by_length(data)
  values, status = {}, {}
  for row in range(bins):
    bucket = BUCKETS[_depth_bin((row + 0.5) / bins, len(BUCKETS))]  # bucket of the bin's middle
    for col, length in enumerate(lengths):
      cell = (row, length)
      if counts[cell]:
        values[row, col] = (sums[cell] / counts[cell], counts[cell])
      else:
        entry = by_length.get(length, {}).get(bucket)
        if entry is not None and entry["status"] != "ok":
          status[row, col] = _status_text(entry["status"])
  return values, status


def passkey_heatmap(results: Union[Results, Sequence[Results]], path: str, metric: str = "exact_match",
                    depth_bins: int | None = None, cmap: str = "viridis") -> str:
  """Writes a PNG heatmap per model (x = length, y = needle depth, colour = accuracy); returns path.

  Lengths are categorical columns in increasing order (powers of two come out log-spaced).
  depth_bins=None picks choose_depth_bins(); 3 bins are the start/middle/end buckets. Colour is
  the mean of `metric` (0..1, fixed scale); each cell is annotated with it and its example
  count. Cells whose bucket has a status other than 'ok' (e.g. exceeds context) are grey
  hatched 'n/a'; cells with no examples are light grey '-'.
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
  items = _as_list(results)
  bins = choose_depth_bins(items) if depth_bins is None else depth_bins
  if bins < 1:
    raise ValueError(f"depth_bins must be positive, got {bins}.")

  import numpy as np  # matplotlib lazily: the table needs none of it
  from matplotlib import colormaps
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch, Rectangle

  lengths_per_model = [sorted({e["length"] for e in d["summary"]} | {e["length"] for e in d["results"]})
                       for d in items]
  width = sum(1.5 + 0.85 * max(len(lengths), 1) for lengths in lengths_per_model) + 1.5
  fig = Figure(figsize=(max(width, 5.0), 1.9 + 0.5 * bins + (0.3 if bins == 3 else 0)), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(items), squeeze=False,
                      width_ratios=[max(len(n), 1) for n in lengths_per_model])[0]
  colormap = colormaps[cmap]
  image = None
  for ax, data, lengths in zip(axes, items, lengths_per_model):
    values, status = _grid(data, lengths, bins, metric)
    grid = np.full((bins, max(len(lengths), 1)), np.nan)
    for (row, col), (value, _) in values.items():
      grid[row, col] = value
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=colormap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_facecolor("0.93")  # no data
    for row in range(bins):
      for col in range(len(lengths)):
        if (row, col) in values:
          value, count = values[row, col]
          ink = "black" if value >= 0.5 else "white"
          ax.text(col, row, f"{value:.2f}\nn={count}", ha="center", va="center", fontsize=7, color=ink)
        elif (row, col) in status:
          ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, facecolor="0.6", edgecolor="0.35",
                                 hatch="///", linewidth=0))
          ax.text(col, row, f"n/a\n{status[row, col]}", ha="center", va="center", fontsize=6, color="black",
                  bbox=dict(facecolor="0.85", edgecolor="none", pad=1))
        else:
          ax.text(col, row, "-", ha="center", va="center", fontsize=8, color="0.4")
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(bins), _depth_labels(bins), fontsize=7 if bins > 3 else 8)
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("needle depth (0 = start of input)")
    title = str(data["model"]) + ("" if data["step"] is None else f" (step {data['step']})")
    ax.set_title(title if len(items) > 1 else f"Passkey retrieval: {title}", fontsize=10)
  colorbar = fig.colorbar(image, ax=list(axes), fraction=0.05, pad=0.02)
  colorbar.set_label(METRIC_NAMES[metric])
  legend = [Patch(facecolor="0.6", edgecolor="0.35", hatch="///", label="n/a: not run (e.g. exceeds context)"),
            Patch(facecolor="0.93", edgecolor="0.6", label="-: no examples")]
  fig.legend(handles=legend, loc="outside lower center", ncols=2, fontsize=7, frameon=False)
  if len(items) > 1:
    fig.suptitle(f"Passkey retrieval, {METRIC_NAMES[metric]}")
  if files.is_local(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
  else:  # matplotlib writes only local files
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format=os.path.splitext(path)[1][1:] or "png")
    files.write_atomic(path, buffer.getvalue())
  return path
