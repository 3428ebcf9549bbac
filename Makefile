# Stagecraft — `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo

.DEFAULT_GOAL := help

# Docker targets use the engine when one answers (STACK_MODE=native forces local processes).
STACK_MODE ?= auto
ENGINE := $(if $(filter native,$(STACK_MODE)),,$(shell docker info >/dev/null 2>&1 && echo yes))
COMPOSE_CMD := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
ENV_FILE := $(if $(wildcard .env),--env-file .env,)
COMPOSE := $(COMPOSE_CMD) -p stagecraft -f docker/docker-compose.yml $(ENV_FILE)
STACK := scripts/stack.sh
STACK_REDIS_PORT ?= 6380

.PHONY: help
help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

.PHONY: dev
dev: ## Run the API and workers in one process (embedded store, mock providers) on :8000
	$(CARGO) run --release -- dev

# The store of the Docker stacks: redis, or postgres (make dev-docker STORE=postgres).
STORE ?= redis
ifeq ($(STORE),postgres)
STORE_RUN := QUEUE_BACKEND=postgres DATABASE_URL=postgres://stagecraft:stagecraft@postgres:5432/stagecraft
STORE_COMPOSE := --profile postgres
endif

.PHONY: dev-docker
dev-docker: ## Development stack in Docker: api, scalable workers, redis (STORE=postgres: PostgreSQL); rebuilds on change
ifeq ($(ENGINE),yes)
	@echo "dev-docker: using the Docker engine, store $(STORE)"
	$(STORE_RUN) $(COMPOSE) $(STORE_COMPOSE) up -d --build api worker $(STORE)
else
	@echo "dev-docker: no Docker engine answers here; run 'make dev' (one process) or 'make dev-awo' (the same topology as local processes)" >&2
	@exit 1
endif

.PHONY: dev-awo
dev-awo: ## The work-order stack: redis, API (also on ARCHON_AWO_PORT), workers, work-order worker
ifeq ($(ENGINE),yes)
	@echo "dev-awo: using the Docker engine"
	$(COMPOSE) --profile awo up -d --build
else
	@echo "dev-awo: no Docker engine; running the stack as local processes (.run/stack)"
	@STACK_REDIS_PORT=$(STACK_REDIS_PORT) $(STACK) up --awo
endif

.PHONY: stop
stop: ## Stop the stack (Docker or local processes)
ifeq ($(ENGINE),yes)
	$(COMPOSE) --profile awo down
else
	@STACK_REDIS_PORT=$(STACK_REDIS_PORT) $(STACK) stop
endif

.PHONY: logs
logs: ## Follow the stack's logs
ifeq ($(ENGINE),yes)
	$(COMPOSE) --profile awo logs -f
else
	@$(STACK) logs
endif

.PHONY: awo-logs
awo-logs: ## Follow the work-order worker's logs
ifeq ($(ENGINE),yes)
	$(COMPOSE) --profile awo logs -f awo-worker
else
	@$(STACK) logs awo-worker
endif

.PHONY: awo-restart
awo-restart: ## Restart the work-order worker
ifeq ($(ENGINE),yes)
	$(COMPOSE) --profile awo restart awo-worker
else
	@STACK_REDIS_PORT=$(STACK_REDIS_PORT) $(STACK) restart awo-worker
endif

.PHONY: awo-shell
awo-shell: ## A shell in the work-order worker's environment
ifeq ($(ENGINE),yes)
	$(COMPOSE) --profile awo exec awo-worker sh
else
	@STACK_REDIS_PORT=$(STACK_REDIS_PORT) $(STACK) shell
endif

.PHONY: scale
scale: ## Run N workers: make scale N=3
	@test -n "$(N)" || { echo "usage: make scale N=3" >&2; exit 1; }
ifeq ($(ENGINE),yes)
	$(COMPOSE) up -d --no-recreate --scale worker=$(N) worker
else
	@STACK_REDIS_PORT=$(STACK_REDIS_PORT) $(STACK) scale $(N)
endif

.PHONY: redis-cli
redis-cli: ## A redis-cli on the stack's Redis
ifeq ($(ENGINE),yes)
	$(COMPOSE) exec redis redis-cli
else
	redis-cli -p $(STACK_REDIS_PORT)
endif

.PHONY: build
build: ## Build the release binary (target/release/stagecraft)
	$(CARGO) build --release

.PHONY: test-deps
test-deps: ## Install (as root) or name the system packages the tests need
	@scripts/test-deps.sh

.PHONY: test
test: test-deps ## Run every test (unit and integration, real processes) and a short fuzz pass of the API
	$(CARGO) test --workspace --lib --bins --tests
	@scripts/fuzz.sh --short

.PHONY: limits
limits: ## Run the largest input of every agent and check a worker stays under 200 MB (minutes)
	$(CARGO) test --test it -- --ignored --nocapture limits

.PHONY: docker-e2e
docker-e2e: ## Build the images and prove the production stack under a real Docker engine (not part of make test)
	@scripts/docker-e2e.sh

.PHONY: chaos
chaos: test-deps ## Measure what a Redis failover loses without durable acknowledgements (three failovers under load)
	$(CARGO) test --test it -- --ignored --nocapture failover

.PHONY: fuzz
fuzz: ## Fuzz the API against its OpenAPI document (schemathesis, all checks, default settings)
	@scripts/fuzz.sh

.PHONY: bench
bench: ## Measure throughput, latency and recovery (release build), BullMQ beside it when npm is there
	@if command -v npm >/dev/null 2>&1; then \
		npm install --prefix benches/peers/bullmq --no-audit --no-fund --no-save --loglevel=error; \
	else \
		echo "npm not found: the bench runs without its BullMQ comparison (apt-get install nodejs npm)"; \
	fi
	$(CARGO) bench --bench engine

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: lint
lint: ## Check formatting and clippy lints
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: migrate
migrate: ## Create or update the store's schema
	$(CARGO) run --release -- migrate
