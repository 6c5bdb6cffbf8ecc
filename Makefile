# Two commands for a fresh machine:
#   make demo   end-to-end demo (server + edge on loopback, LFW faces, summary table)
#   make test   the test suite (CI runs exactly this)
# Both create .venv/ at the repository root and install what they need into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test protos check-protos lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/facelink demo

test: $(STAMP)
	$(PY) protos/generate.py --check
	$(PY) -m pytest

# Regenerate the Python stubs after editing protos/facelink/v1/*.proto (commit the result).
protos: $(STAMP)
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
