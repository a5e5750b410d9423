# InferenceHub: `make run` starts the system, `make test` runs every check.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Python keeps what it compiles in __pycache__ (ignored by git): a test run starts hundreds of Python processes, and
# without that cache each one compiles every module it imports again (a second of CPU for a replica). Where the
# environment sets PYTHONDONTWRITEBYTECODE, what make runs does not inherit it.
unexport PYTHONDONTWRITEBYTECODE
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: run test test-containers bench lint format proto install tools models clean kind-up kind-demo kind-down minikube-up minikube-demo minikube-down

# pip installs uv, uv the rest (in parallel: 16-18 s on a fresh machine, pip took 83). Nothing is compiled ahead:
# Python compiles what it imports on first use and keeps it.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# The example scikit-learn and ONNX models, trained and exported here (nothing downloaded, nothing committed),
# beside links to the shipped models: the repository `make run` serves.
MODELS := build/models/.built
$(MODELS): $(STAMP) scripts/build_models.py scripts/train_iris.py data/iris.csv $(wildcard services/inferencehub/model_repository/*/config.json)
	$(PY) scripts/build_models.py --out build/models --shipped
	@touch $@

models: $(MODELS)

run: $(MODELS)
	$(VENV)/bin/inferencehub up --models build/models

# The system tests wait on processes and sockets more than they compute: SYSTEM_WORKERS pytest workers share
# them, a module at a time each (a module's servers and its order stay together; the benchmarks one each), the
# longest first (tests/system/conftest.py).
SYSTEM_WORKERS ?= 3
test: lint tools docs
	$(PY) -m pytest tests/unit -q -p no:cacheprovider
	$(PY) -m pytest tests/system -n $(SYSTEM_WORKERS) --dist loadfile --no-loadscope-reorder

# The docs site (mkdocs.yml), strict: a broken link or anchor fails it. build/ is not committed.
.PHONY: docs
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

# Both images built with podman and run together as compose.yaml declares (root; ~5 minutes, first run longer).
test-containers: $(STAMP)
	$(PY) -m pytest tests/containers -v -s

bench: $(STAMP)
	$(PY) scripts/install_tools.py --bench
	$(PY) benchmarks/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

tools: $(STAMP)
	$(PY) scripts/install_tools.py

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build/models

# The Kubernetes path on a local cluster (needs docker or podman, kubectl, helm, and kind or minikube).
kind-up kind-demo kind-down minikube-up minikube-demo minikube-down:
	scripts/k8s.sh $(firstword $(subst -, ,$@)) $(lastword $(subst -, ,$@))
