# drkeras: two commands for users (make reproduce, make test), plus helpers for developers.
# The virtual environment is rebuilt only when requirements.txt or setup.cfg change.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv reproduce test lint format bench contact-sheet clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.cfg
	@command -v $(PYTHON) >/dev/null || { echo "drkeras needs $(PYTHON) (3.9-3.11); set PYTHON=..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23,<25"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The headline experiment (PLDMLT) on the embedded synthetic data with the smoke preset.
reproduce: $(STAMP)
	$(PY) experiments/pldmlt.py --data synthetic --preset smoke --out runs/pldmlt_smoke

test: $(STAMP) lint
	$(PY) -m pytest

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

clean:
	rm -rf $(VENV) runs .pytest_cache
