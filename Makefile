# Two commands for a fresh machine with Python 3.11 and make:
#   make lab    set up .venv (once) and open the course in JupyterLab at notebooks/
#   make test   set up .venv (once) and run the whole test suite, notebooks included
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch is plenty for the course; override for CUDA, e.g. TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sara-edu-installed
# Two test processes (pytest-xdist), one torch thread each: measured on the 2-core box, the same CPU time as one
# process and 0.67x (quiet) to 0.84x (beside 2 busy processes) its wall time (benchmarks/results/suite_cost.csv).
# PYTEST_ARGS="-n 0" runs serially.
PYTEST_ARGS ?= -n 2

.PHONY: lab lab-settings test setup data study controls handouts bench clean-venv

setup: $(STAMP)

# Re-runs only when pyproject.toml changes: a second `make test` installs nothing.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Jupyter refuses to run as root (Docker, cloud notebooks) unless told it may; listen on this machine only.
LAB_UID ?= $(shell id -u)
LAB_FLAGS := --ip=127.0.0.1 $(if $(filter 0,$(LAB_UID)),--allow-root)
# A default for this venv's JupyterLab only: save widget state with the notebook, so that a notebook saved and
# reopened without its kernel still draws its sliders instead of "Error displaying widget: model not found".
LAB_DEFAULTS := $(VENV)/share/jupyter/lab/settings/overrides.d/sara-edu.json

lab: $(STAMP) lab-settings
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) notebooks/

# Widget state saved with notebooks; no news pop-up over the first cell (it asks to fetch news on first start).
lab-settings:
	mkdir -p $(dir $(LAB_DEFAULTS))
	echo '{"@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": true}, "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' > $(LAB_DEFAULTS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Regenerate the shipped model, checkpoints and classifier in data/ (just under an hour on a shared 2-core CPU).
data: $(STAMP)
	$(PY) -m sara_edu.world.recipes.pretrain
	$(PY) -m sara_edu.world.recipes.classifier

# The study behind reports/study.md (about 2 hours on a 2-core CPU; resumable: rerun to continue), its sample
# grid, and the where-vs-how controls behind reports/controls.md (`make controls`).
study: $(STAMP)
	$(PY) -m sara_edu.study run --workers 2 --threads 1
	$(PY) -m sara_edu.study samples --study full
	$(PY) -m sara_edu.study report

# Every notebook executed in its full setting and rendered to handouts/NN_name.html (not committed; ~30 min), and
# the text of its outputs to notebooks/records/NN_name.full.json (committed: full-setting sentences are checked on it).
handouts: $(STAMP)
	$(PY) -m sara_edu.lessons.handouts notebooks/0*.ipynb --out handouts --record notebooks/records

controls: $(STAMP)
	$(PY) -m sara_edu.study run --study controls --workers 2 --threads 1
	$(PY) -m sara_edu.study samples --study controls
	$(PY) -m sara_edu.study report --csv reports/controls_results.csv --out reports/controls.md

bench: $(STAMP)
	$(PY) benchmarks/memory_time.py

clean-venv:
	rm -rf $(VENV)
