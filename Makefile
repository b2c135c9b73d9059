# The two commands of the README. Both create .venv on a fresh machine and are safe to rerun.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
EXTRAS ?= dev

.PHONY: demo test install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: it is the CPU build on this machine's disk, and it satisfies the project's
# torch>=2.4 so that pip never pulls a multi-GB CUDA build.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/ember quickstart

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
