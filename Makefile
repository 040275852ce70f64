# Two commands do all the set-up on a fresh machine:
#   make demo   - environment + synthetic ImageNet + prepare + train on local Ray, logged to local MLflow
#   make test   - environment + the whole test suite (unit, local-Ray pipeline, integration on real servers)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := .demo

.PHONY: venv postgres browser demo test test-fast lint format clean-demo services-up services-down

# One pip resolve for everything so that boto3's botocore matches aiobotocore's pin.
# setup.py builds the cropped JPEG decoder (a C extension): a change to its source reinstalls.
$(STAMP): pyproject.toml setup.py imagenet_ray/data/_jpeg_crop.c
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "imagenet-ray needs Python 3.11, got " + sys.version.split()[0]'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/imagenet-ray synth --out $(DEMO)/raw --classes 10 --train-per-class 100 --val-per-class 20
	$(BIN)/imagenet-ray prepare --source $(DEMO)/raw --out $(DEMO)/prepared --shard-mb 16
	$(BIN)/imagenet-ray train --config configs/local.yaml name=local-$$(date +%Y%m%d-%H%M%S)

# PostgreSQL, MLflow's database in the integration tests (as in the k8s deployment): the distribution's
# package, installed here when missing and we are root with apt-get. Anywhere else this says so, and
# the PostgreSQL tests fail with the same advice (they are never skipped).
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing PostgreSQL: apt-get install postgresql"; \
		out=$$( (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends postgresql) 2>&1) \
			|| { echo "$$out" >&2; echo "make: installing PostgreSQL failed" >&2; exit 1; }; \
	else \
		echo "WARNING: PostgreSQL is not installed (no initdb); install it (apt-get install postgresql)," \
			"or the PostgreSQL tests fail" >&2; \
	fi

# Chromium, the headless browser of the MLflow UI test (tests/integration/test_mlflow_ui.py): the
# distribution's package (~125 MB download, ~500 MB installed, ~15 s), installed like PostgreSQL above.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
		|| command -v google-chrome >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Chromium: apt-get install chromium"; \
		out=$$( (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends chromium) 2>&1) \
			|| { echo "$$out" >&2; echo "make: installing Chromium failed" >&2; exit 1; }; \
	else \
		echo "WARNING: Chromium is not installed; install it (apt-get install chromium)," \
			"or the MLflow UI test fails" >&2; \
	fi

# PATH: Ray jobs submitted by the tests run `python` from the same environment.
test: $(STAMP) postgres browser
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not integration and not slow"

# The static checks alone (make test runs them too, in tests/unit/test_static_checks.py).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

services-up: $(STAMP)
	$(BIN)/imagenet-ray services up

services-down: $(STAMP)
	$(BIN)/imagenet-ray services down

clean-demo:
	rm -rf $(DEMO)
