# Two commands do all set-up on a fresh machine:
#   make demo   the main job on the built-in models (the organism and SmolLM2)
#   make test   the test suite
# Both create .venv when missing, install torch (CPU build) first, then the package, then fetch
# and convert SmolLM2-135M-Instruct into the cache outside the repository (once; later runs only
# check it: python -m interp.smollm2 setup).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNEL := agent-refusal-interp
export BROWSER_PATH ?= /usr/bin/chromium
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test setup smollm2 chromium bench clean

setup: $(STAMP) chromium smollm2

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "agent-refusal-interp (.venv)" >/dev/null
	touch $(STAMP)

# Not stamped: the cache lives outside the repository and outlives .venv; the command itself does
# nothing but check sha256s when the converted checkpoint is already there and complete.
smollm2: $(STAMP)
	$(PY) -m interp.smollm2 setup

# Static figure export (kaleido) needs a Chromium. Without root, figures still come out as HTML.
chromium:
	@command -v chromium >/dev/null 2>&1 || test -x $(BROWSER_PATH) || \
	  ( [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ) || \
	  echo "note: no Chromium; figures are written as HTML only. For PNGs: sudo apt-get install -y chromium"

demo: setup
	$(PY) -m interp.demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/cache_overhead.py
	$(PY) bench/probe_fit.py

clean:
	rm -rf $(VENV) runs build *.egg-info
