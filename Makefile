# Everything a fresh Debian + Python 3.11 box needs, from nothing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.toco-installed
# postgresql: the fleet tests start throw-away clusters with its initdb/pg_ctl (tests/fleet/postgres.py)
APT_PACKAGES := mosquitto mosquitto-clients chromium postgresql

.PHONY: setup system-deps lint test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: the CPU build lies on local disk; anything looser pulls CUDA.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[agent,server,dev]'
	touch $(STAMP)

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# the engineering gate, make test runs it first so CI fails on it: ruff (pycodestyle, pyflakes,
# isort, bugbear, pyupgrade, simplify), mypy (strict on toco_core and agent, default settings on
# fleet_server, toco_cli, bench and tests) and the layering contracts (import-linter); the rules
# are pyproject's [tool.ruff], [tool.mypy] and [tool.importlinter]
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# two pytest-xdist workers, each test file on one (its module fixtures: brokers, servers, clusters, made once);
# TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= 2
test: setup system-deps lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: setup
	$(VENV)/bin/toco demo

bench: setup
	$(PY) bench/analysis.py
	$(PY) bench/compression.py
	$(PY) bench/bundle.py --models lenet5,mlp,large-s0,large-s1
	$(PY) bench/agent.py
	$(PY) bench/fleet.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
