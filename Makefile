# drkeras: two commands for users (make reproduce, make test), plus helpers for developers.
# The virtual environment is rebuilt only when requirements.txt or setup.cfg change.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# GPU=1 adds TensorFlow's pinned CUDA 12.2 / cuDNN 8.9 libraries (requirements-gpu.txt).
GPU ?= 0
CPU_STAMP := $(VENV)/.installed
STAMP := $(if $(filter 1,$(GPU)),$(VENV)/.installed-gpu,$(CPU_STAMP))

.PHONY: venv reproduce test test-slow lint format bench contact-sheet predict-example dry-run plan evidence clean

venv: $(STAMP)

$(CPU_STAMP): requirements.txt setup.cfg
	@command -v $(PYTHON) >/dev/null || { echo "drkeras needs $(PYTHON) (3.9-3.11); set PYTHON=..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23,<25"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(CPU_STAMP)

$(VENV)/.installed-gpu: $(CPU_STAMP) requirements-gpu.txt
	$(PY) -m pip install --quiet -r requirements-gpu.txt
	$(PY) -c "import tensorflow as tf; print('GPUs visible to TensorFlow:', tf.config.list_physical_devices('GPU') or 'none')"
	touch $@

# The headline experiment (PLDMLT) on the embedded synthetic data with the smoke preset.
reproduce: $(STAMP)
	$(PY) experiments/pldmlt.py --data synthetic --preset smoke --out runs/pldmlt_smoke

# The suite in TEST_WORKERS processes, one test file each at a time (module fixtures built once):
# on 2 cores 18 minutes instead of 34 with one process, which keeps one core busy.
TEST_WORKERS ?= 2
test: $(STAMP) lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The dry runs of whole experiments (a few minutes each) that `make test` leaves out.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) -m benchmarks --out runs/bench

contact-sheet: $(STAMP)
	$(PY) -m data_prep.contact_sheet --out runs/contact_sheet.png

# A first prediction on a real photograph (scikit-image's retina.jpg, CC0) with the model that
# `make reproduce` exported.
predict-example: $(STAMP)
	@test -d runs/pldmlt_smoke/export/pldmlt || { echo "run 'make reproduce' first"; exit 1; }
	$(PY) -m drkeras.data.samples --out runs/example
	$(PY) -m drkeras.predict --model runs/pldmlt_smoke/export/pldmlt --images runs/example/retina.jpg --out runs/example/predictions

PAPERS := pldmlt mtunet collaborative ssl_gan cooperative

# Every stage of the five paper presets for 2 steps at per-replica batches 1 and 2, on synthetic
# images at the papers' resolutions, offline (ImageNet weights replaced by random ones):
# runs/dry_run/<paper>/dry_run.json and plan.json. PAPERS="mtunet" runs one.
dry-run: $(STAMP)
	@for p in $(PAPERS); do \
		echo "== dry run: $$p (paper preset)"; \
		$(PY) experiments/$$p.py --preset paper --dry-run --random-weights --fresh \
			--out runs/dry_run/$$p || exit 1; \
	done

# The resource plan of the five paper presets at the datasets' published sizes (no data needed).
plan: $(STAMP)
	@for p in $(PAPERS); do \
		$(PY) -m drkeras.plan --experiment $$p --preset paper --published --out runs/plan/$$p \
			|| exit 1; \
	done

# Evidence that the methods learn: the mini presets over SEEDS seeds, the papers' claims, one
# leaderboard on held-out synthetic images and figures into runs/evidence/ (evidence.md lists
# each part's time). Run again, it resumes. PAPERS="mtunet" SEEDS=1 narrows it.
SEEDS ?= 3
evidence: $(STAMP)
	$(PY) -m drkeras.evidence --out runs/evidence --seeds $(SEEDS) --papers $(PAPERS)
clean:
	rm -rf $(VENV) runs .pytest_cache
