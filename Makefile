# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create .venv, install the project with every extra, and install the Debian data packages they use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEB_PACKAGES := dataset-fashion-mnist tuxpaint-stamps-default
INSTALL_STAMP := $(VENV)/.install-stamp

.PHONY: all install data demo test test-fast bench clean help triton-env

help:
	@echo "make demo   - run the end-to-end demo on real data (installs what it needs)"
	@echo "make test   - run the full test suite (installs what it needs)"
	@echo "make bench  - run the benchmarks of bench/ (slow; results go to docs/benchmarks.md by hand)"

$(INSTALL_STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[export,serve,monitor,dev]"
	# foolbox is installed only for the 100 real sample images its wheel ships (no code of it is used).
	$(BIN)/python -m pip install --quiet --no-deps "foolbox==3.3.4"
	touch $(INSTALL_STAMP)

install: $(INSTALL_STAMP)

data:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian data packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: install data
	$(BIN)/python -m dinoforge.core.demo

test: install data triton-env
	$(BIN)/python -m pytest

test-fast: install data
	$(BIN)/python -m pytest -m "not slow"

bench: install data
	$(BIN)/python -m pytest --co -q >/dev/null
	@for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# Isolated venv with a real tritonserver (nvidia-pytriton pins numpy<2, so never in .venv) for export tests.
triton-env:
	PYTHON=$(PYTHON) bash export/triton_env.sh .venv-triton || echo "warning: .venv-triton could not be created; the tritonserver integration test will be skipped"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
