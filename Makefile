# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/passkey_demo

.PHONY: demo test test-multihost test-all bench clean system-deps

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

# The passkey experiment (experiments/infini_passkey/README.md): stage 1 trains the tiny Infini
# model on short prompts, stage 2 warm-starts from it with long-haystack write weights, then the
# eval at 2K..1M tokens prints Table 3 (exact match, then token accuracy beside the paper's) and
# draws the heatmap. Each step resumes where a killed run stopped. Full logs: $(DEMO_DIR)/*/logs/.
# DEMO_SEED picks the initialisation and the training data (the eval keys stay the same).
DEMO_ENV := TF_CPP_MIN_LOG_LEVEL=3 GRPC_VERBOSITY=ERROR
DEMO_EXAMPLES ?= 4
DEMO_SEED ?= 0
DEMO_SEED_FLAGS = --gin.train.seed=$(DEMO_SEED) --gin.passkey_task.seed=$(DEMO_SEED)
demo: $(STAMP)
	@mkdir -p $(DEMO_DIR)
	@$(DEMO_ENV) $(PY) -m memlm_jax.train --quiet --gin_file=runs/train.gin --gin_file=tiny/infini_passkey.gin \
	  --gin.MODEL_DIR="'$(DEMO_DIR)/stage1'" $(DEMO_SEED_FLAGS) 2>$(DEMO_DIR)/stderr.log || { cat $(DEMO_DIR)/stderr.log; exit 1; }
	@$(DEMO_ENV) $(PY) -m memlm_jax.train --quiet --gin_file=runs/train.gin --gin_file=tiny/infini_passkey_stage2.gin \
	  --gin.MODEL_DIR="'$(DEMO_DIR)/stage2'" --gin.INIT_FROM="'$(DEMO_DIR)/stage1'" $(DEMO_SEED_FLAGS) 2>$(DEMO_DIR)/stderr.log \
	  || { cat $(DEMO_DIR)/stderr.log; exit 1; }
	@$(DEMO_ENV) $(PY) -m memlm_jax.eval --quiet --gin_file=runs/passkey_eval.gin --gin_file=tiny/infini_passkey.gin \
	  --gin.MODEL_DIR="'$(DEMO_DIR)/stage2'" --gin.passkey_eval.examples_per_bucket=$(DEMO_EXAMPLES) \
	  --gin.passkey_eval.label="'Infini (delta), 2 stages'" 2>$(DEMO_DIR)/stderr.log \
	  || { cat $(DEMO_DIR)/stderr.log; exit 1; }
	@$(PY) scripts/make_tables.py passkey $(DEMO_DIR)/stage2 --metric=both --heatmap $(DEMO_DIR)/passkey_heatmap.png

# Tests are spread over TEST_WORKERS processes (pytest-xdist; an idle worker steals queued tests).
# JAX compiles on one core, so two workers keep a 2-core machine busy.
TEST_WORKERS ?= 2
TEST_FLAGS = -q -n $(TEST_WORKERS) --dist worksteal
test: $(STAMP)
	$(PY) -m pytest $(TEST_FLAGS) -m "not slow and not multihost" tests

# Several JAX processes per test (tests/test_multihost.py): one test at a time, since each test
# already runs two processes and a starved process would miss its heartbeats.
test-multihost: $(STAMP)
	$(PY) -m pytest -q -n 0 -m "multihost and not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest $(TEST_FLAGS) -m "not multihost" tests
	$(PY) -m pytest -q -n 0 -m multihost tests

bench: $(STAMP)
	$(PY) scripts/bench_train_step.py --output=results/bench_train_step.json
	$(PY) scripts/bench_infini.py --output=results/bench_infini.json
	$(PY) scripts/bench_rnnt.py --output=results/bench_rnnt.json
	$(PY) scripts/bench_kmp.py --output=results/bench_kmp.json
	$(PY) scripts/bench_nam.py --output=results/bench_nam.json

clean:
	rm -rf $(VENV) runs results
