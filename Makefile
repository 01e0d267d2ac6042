# Every target is idempotent: .venv/ is created only when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck check data clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian's Fashion-MNIST, when apt can install it; the demo falls back to digits otherwise.
data:
	@test -d /usr/share/datasets/fashion-mnist || \
	  ( command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) ) || \
	  echo "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); using digits."

demo: venv data
	$(BIN)/pnc demo

# one worker per core (pytest-xdist; each test runs one intra-op thread): 15 min -> 8 min on 2 cores;
# loadgroup keeps the tests marked xdist_group("ray") on one worker (one local Ray at a time)
TEST_WORKERS ?= auto
test: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

# ruff (lint + format check) over every Python file; mypy over the core (surgery/, adapters/)
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# what CI runs: lint, type check, the tests, the main job
check: lint typecheck test demo

clean:
	rm -rf $(VENV) build *.egg-info
