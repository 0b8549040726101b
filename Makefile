# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup browser bench-quick clean

# torch first, pinned: `torch==2.13.0` takes the local CPU build here and the CUDA build
# on a GPU machine; an unpinned torch would pull gigabytes of CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/vggkit train

# The HTML report's browser test needs Debian's chromium; it skips (saying why) without it.
browser:
	@command -v chromium >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: chromium could not be installed; the browser test will skip"

# Two test processes (one per core here; -n auto: one per core anywhere), each on one thread:
# 1.5x quicker than one process on two threads, as most tests are small.
test: setup browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto

bench-quick: setup
	$(BIN)/python bench/train_step.py --quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
