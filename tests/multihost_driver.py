"""Runs a list of launcher steps (train / eval) in one process, so a multi-process test pays the
imports once: `python tpu/pod.py --local 2 launch --module tests.multihost_driver -- PLAN.json`.

PLAN.json: {"steps": [{"name", "kind": "train"|"eval"|"infer", "files", "bindings", "model_dir"}],
"out": dir}. `--gin.X=Y` flags after the plan (pod.py's distributed settings) apply to every
step. Each process writes what each step returned to <out>/<name>.process<i>.json.
"""

from __future__ import annotations

import json
import os
import sys

from memlm_jax import gin_utils
from memlm_jax import registry  # noqa: F401  (every gin configurable, launchers included)
from memlm_jax.launch import eval_lib, infer_lib, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH_PATHS = [os.path.join(REPO, "configs"), REPO]
STEPS = {"train": train_lib.train, "eval": eval_lib.run_eval, "infer": infer_lib.infer}


def main(argv: list[str]) -> None:
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  [plan_file] = [arg for arg in argv if not arg.startswith("--")]
  with open(plan_file) as f:
    plan = json.load(f)
  extra = [arg[len("--gin_bindings="):] for arg in gin_utils.rewrite_gin_args([a for a in argv if a != plan_file])]
  for step in plan["steps"]:
    gin.clear_config()
    gin_utils.parse_gin(step["files"], step["bindings"] + [f"MODEL_DIR = {step['model_dir']!r}"] + extra,
                        SEARCH_PATHS)
    result = STEPS[step["kind"]](step["model_dir"])
    with open(os.path.join(plan["out"], f"{step['name']}.process{jax.process_index()}.json"), "w") as f:
      json.dump(result, f, default=float)


if __name__ == "__main__":
  main(sys.argv[1:])
