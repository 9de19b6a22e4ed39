# zmachine-operator: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CACHE := .cache
STAMP := $(VENV)/.installed

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@bash hack/install-system-deps.sh
	@test -x $(BIN)/python || { echo "[venv] creating $(VENV)"; $(PY) -m venv $(VENV); }
	@echo "[venv] installing Python packages (pinned by constraints.txt)"
	@$(BIN)/pip install --progress-bar on -q --upgrade pip
	@$(BIN)/pip install --progress-bar on -c constraints.txt -e '.[dev]'
	@touch $@

venv: $(STAMP) ## create .venv with the pinned dependencies

lock: ## re-resolve Python dependencies into constraints.txt
	@rm -rf $(CACHE)/lockvenv && $(PY) -m venv $(CACHE)/lockvenv
	@$(CACHE)/lockvenv/bin/pip install -q '.[dev]'
	@$(CACHE)/lockvenv/bin/pip freeze --exclude zmachine-operator | sort > constraints.txt
	@echo "[lock] wrote constraints.txt"

kube-assets: ## build kube-apiserver, etcd and kubectl (cached)
	@bash hack/build-kube-assets.sh >/dev/null

helm: ## build helm from its Go module (cached)
	@bash hack/build-helm.sh >/dev/null

virtiofsd: ## build the Rust virtiofsd from crates.io (cached)
	@bash hack/build-virtiofsd.sh >/dev/null

console-assets: ## copy xterm.js (pinned by package-lock.json) into the console package (cached)
	@bash hack/build-console-assets.sh >/dev/null

wireguard-go: ## build wireguard-go, the private networks' overlay, from its Go module (cached)
	@bash hack/build-wireguard-go.sh >/dev/null

versitygw: ## build versitygw, the S3 server the s3:// store tests use (cached)
	@bash hack/build-versitygw.sh >/dev/null

standin-vmm: ## build the stand-in VMM the agent tests and the scale benchmark run (cached)
	@bash hack/build-standin-vmm.sh >/dev/null

debian-vm-root: ## debootstrap the seed's guide guests: a Debian 12 VM root, a container image (cached)
	@bash hack/build-debian-vm-root.sh >/dev/null

generate: $(STAMP) ## regenerate the CRDs and the gRPC code from their sources
	@$(BIN)/python -m controller.api.crdgen --out crds
	@bash hack/sync-chart-crds.sh
	@bash hack/gen-proto.sh

lint: $(STAMP) ## ruff, mypy and the generated-file drift checks
	$(BIN)/ruff check controller tests hack
	$(BIN)/ruff format --check controller tests hack
	$(BIN)/mypy
	$(BIN)/python -m controller.api.crdgen --out crds --check

test: $(STAMP) kube-assets helm virtiofsd console-assets wireguard-go versitygw standin-vmm lint ## the whole test suite (what CI runs)
	@# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	  exit $$rc

test-cluster: $(STAMP) kube-assets helm virtiofsd ## the chart on a real one-node cluster (CI runs it after `make test`)
	@$(BIN)/pytest -m cluster tests/cluster $(PYTEST_ARGS)

# Apart from `make test`: its first run debootstraps the guests (9-16 min) and a Debian boot
# under TCG to an SSH login takes 10-20 min, more than the 90 minutes of a fresh CI run leave.
test-seedguide: $(STAMP) virtiofsd debian-vm-root ## the seed's guide: Debian guests from a hub, logged into over SSH (CI runs it after `make test`)
	@$(BIN)/pytest -m seedguide tests/e2e/test_seed_guide.py $(PYTEST_ARGS)

bench: $(STAMP) standin-vmm ## benchmarks; figures go to docs/benchmarks.md
	$(BIN)/python -m tests.bench

run: $(STAMP) kube-assets virtiofsd console-assets wireguard-go ## local control plane, CRDs, agent, controller, examples/
	@$(BIN)/python -m hack.devenv up

cluster: $(STAMP) kube-assets ## a real one-node cluster (kubelet, containerd, Prometheus) in netns zmcluster
	@$(BIN)/python -m hack.cluster up

cluster-down: ## remove everything `make cluster` made
	@test -x $(BIN)/python && $(BIN)/python -m hack.cluster down || true

down: ## stop everything `make run` started
	@test -x $(BIN)/python && $(BIN)/python -m hack.devenv down || true

clean: down ## remove the venv and local caches (not the Go-built binaries)
	rm -rf $(VENV) $(CACHE)

.PHONY: help venv lock kube-assets helm virtiofsd console-assets wireguard-go versitygw standin-vmm debian-vm-root generate lint test test-seedguide bench run down cluster cluster-down test-cluster clean
