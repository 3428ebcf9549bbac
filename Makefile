# Stagecraft — `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

.PHONY: dev
dev: ## Run the API and workers in one process (embedded store, mock providers) on :8000
	$(CARGO) run --release -- dev

.PHONY: build
build: ## Build the release binary (target/release/stagecraft)
	$(CARGO) build --release

.PHONY: test-deps
test-deps: ## Install (as root) or name the system packages the tests need
	@scripts/test-deps.sh

.PHONY: test
test: test-deps ## Run every test (unit and integration, real processes)
	$(CARGO) test --lib --bins --tests

.PHONY: bench
bench: ## Measure throughput, latency and recovery (release build)
	$(CARGO) bench --bench engine

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: lint
lint: ## Check formatting and clippy lints
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

.PHONY: migrate
migrate: ## Create or update the store's schema
	$(CARGO) run --release -- migrate
