# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/passkey_demo

.PHONY: demo test test-all bench clean system-deps

# System packages: espeak-ng synthesizes the speech corpus the tests use. Checked on every
# run (cheap), installed with apt when missing (sudo unless root).
system-deps:
	@command -v espeak-ng >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y espeak-ng; }

$(STAMP): setup.cfg pyproject.toml constraints.txt | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The passkey experiment: train the tiny Infini model (resumes if DEMO_DIR has a checkpoint),
# evaluate it at 2K..1M tokens, print Table 3 beside the paper's, draw the heatmap.
demo: $(STAMP)
	$(PY) -m memlm_jax.train --gin_file=configs/runs/train.gin --gin_file=configs/tiny/infini_passkey.gin --gin.MODEL_DIR="'$(DEMO_DIR)'"
	$(PY) -m memlm_jax.eval --gin_file=configs/runs/passkey_eval.gin --gin_file=configs/tiny/infini_passkey.gin --gin.MODEL_DIR="'$(DEMO_DIR)'"
	$(PY) scripts/make_tables.py passkey $(DEMO_DIR) --heatmap $(DEMO_DIR)/passkey_heatmap.png

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) scripts/bench_train_step.py --output=results/bench_train_step.json
	$(PY) scripts/bench_infini.py --output=results/bench_infini.json
	$(PY) scripts/bench_rnnt.py --output=results/bench_rnnt.json
	$(PY) scripts/bench_kmp.py --output=results/bench_kmp.json

clean:
	rm -rf $(VENV) runs results
