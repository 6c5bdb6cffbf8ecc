# Two commands for a fresh machine:
#   make demo   end-to-end demo (server + edge on loopback, LFW faces, summary table)
#   make test   the test suite (CI runs exactly this)
# Both create .venv/ at the repository root and install what they need into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-export protos clean

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

# The training/export tests need torch + compressai (several GB): kept out of `make test`,
# where they skip with that reason. This installs the export extra and runs them.
test-export: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,export]'
	$(PY) -m pytest tests/test_codec_training.py tests/test_codec_bundle.py tests/test_query_training.py tests/test_dlib_convert.py

# Regenerate the Python stubs after editing protos/facelink/v1/*.proto (commit the result).
protos: $(STAMP)
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
