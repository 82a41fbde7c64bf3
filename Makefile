# hmora-ds: every target installs what it needs itself (venv, pinned packages, offline assets).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Where offline assets (converted model, built data) are cached: outside git.
export HMORA_CACHE ?= $(CURDIR)/.cache
PYTEST_ARGS ?=

.PHONY: install mpi test lint format train bench mutate clean image-tools image-cpu image-cuda \
	image-test

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,analysis]"
	@touch $(STAMP)

install: $(STAMP)

# The mpirun launch test needs OpenMPI. CI runs as root on Debian: install it there, quietly and
# only when mpirun is missing. Anywhere else (or if apt fails) that one test skips, saying why.
mpi:
	@if ! command -v mpirun >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing OpenMPI with apt-get (for the mpirun launch test)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends openmpi-bin libopenmpi-dev; } >/dev/null 2>&1 \
	      || echo "make: apt-get could not install OpenMPI; the mpirun test will skip"; \
	  else \
	    echo "make: no mpirun (and not root with apt-get): the mpirun test will skip"; \
	  fi; \
	fi

# pytest exits 5 when it collected nothing: that is a broken suite, never a pass.
test: $(STAMP) mpi
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5) - failing"; exit 1; fi; \
	exit $$rc

# Container images (docs/scaling.md, "Docker"): built with docker where its engine runs, else
# with buildah and run with podman (Debian's packages, installed here when root and missing).
# The base is pulled where possible, else bootstrapped from Debian's packages (docker/build.sh).
image-tools:
	@if { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; } \
	  || { command -v buildah >/dev/null 2>&1 && command -v podman >/dev/null 2>&1 \
	       && command -v debootstrap >/dev/null 2>&1 && command -v runc >/dev/null 2>&1; }; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make: installing buildah, podman, runc and debootstrap with apt-get"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends buildah podman runc debootstrap; } >/dev/null \
	    || { echo "make: apt-get could not install buildah/podman"; exit 1; }; \
	else \
	  echo "make: no Docker engine, and buildah/podman are missing: install one (as root:" \
	    "apt-get install buildah podman runc debootstrap)"; exit 1; \
	fi

image-cpu: image-tools
	docker/build.sh cpu

image-cuda: image-tools
	docker/build.sh cuda

# Inside the CPU image: 2-rank ZeRO-2 training of the tiny model, export, params, the image's
# `make test -m image` subset, and two containers as two nodes (tests/test_image.py).
image-test: $(STAMP) image-cpu
	@rc=0; $(PY) -m pytest -m docker tests/test_image.py $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make image-test: pytest collected no tests (exit 5)"; exit 1; fi; \
	exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check hmora_ds tests launchers docker
	$(VENV)/bin/ruff format --check hmora_ds tests launchers docker
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.cpu
	for f in launchers/*.sh launchers/slurm/*.sbatch docker/*.sh bench/*.sh; do bash -n "$$f" || exit 1; done

format: $(STAMP)
	$(VENV)/bin/ruff format hmora_ds tests launchers docker
	$(VENV)/bin/ruff check --fix hmora_ds tests launchers docker

# The embedded default: SmolLM2-135M-Instruct + the offline mixture, hmora_lw, ZeRO-2.
TRAIN_CONFIG ?= configs/default.yaml
TRAIN_ARGS ?=
TRAIN_OUT ?= runs/default
# A second `make train` continues the run in TRAIN_OUT (a finished run is reported as such, left
# unchanged, and evaluated again); `make train TRAIN_RESUME=--overwrite` starts it over.
TRAIN_RESUME ?= --resume auto
EVAL_BENCHMARKS ?= arc-c,arc-e,obqa,csqa
EVAL_QUESTIONS ?= 100
# GPUs when torch sees any (all of them, one rank each), else 2 CPU ranks; TRAIN_GPUS=0 forces
# the CPU. Evaluated once, when the recipe runs (after the venv exists).
TRAIN_GPUS ?= $(shell $(PY) -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
train: $(STAMP)
	$(eval GPUS := $(TRAIN_GPUS))
	$(eval RANKS := $(if $(filter 0,$(GPUS)),2,$(GPUS)))
	$(eval ON := $(if $(filter 0,$(GPUS)),DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=,))
	@echo "make train: $(if $(filter 0,$(GPUS)),no GPU: 2 CPU ranks,$(GPUS) GPU rank(s))"
	$(ON) $(PY) -m hmora_ds.train.prepare --config $(TRAIN_CONFIG) $(TRAIN_ARGS)
	$(ON) $(VENV)/bin/deepspeed --num_gpus $(RANKS) \
		--master_port $$($(PY) -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
		launchers/train.py --deepspeed ds_configs/zero2.json --config $(TRAIN_CONFIG) $(TRAIN_RESUME) \
		$(TRAIN_ARGS)
	@# What fine-tuning changed: the base model and the best adapter on the same validation
	@# questions of the benchmarks whose *train* splits are in the offline mixture. Option
	@# log-likelihood scoring: the mixture's targets are option texts, not letters. The adapter
	@# scores the base's exact questions (its manifest), so the table's Δ is paired: it ends
	@# with Δ's 95 % confidence interval and a verdict (better / worse / not detectable).
	for who in base adapter; do \
		$(ON) $(VENV)/bin/torchrun --standalone --nproc_per_node $(RANKS) \
			launchers/eval.py --model smollm2-135m-instruct --benchmarks $(EVAL_BENCHMARKS) \
			--split validation --max-questions $(EVAL_QUESTIONS) --max-input-tokens 512 --mode loglik \
			$$([ $$who = adapter ] && echo --adapter $(TRAIN_OUT)/adapter_best \
				--manifest $(TRAIN_OUT)/eval_base/manifest.json) \
			--output-dir $(TRAIN_OUT)/eval_$$who > $(TRAIN_OUT)/eval_$$who.log 2>&1 \
			|| { tail -20 $(TRAIN_OUT)/eval_$$who.log; exit 1; }; \
	done
	@echo; echo "== Benchmarks before / after fine-tuning (validation subsets, $(EVAL_QUESTIONS) questions each)"
	@$(PY) -m hmora_ds.eval.compare $(TRAIN_OUT)/eval_base/results.json \
		$(TRAIN_OUT)/eval_adapter/results.json --labels "SmolLM2-135M base" "+ HMoRA w LW"

# Benchmarks: numbers go to bench/results/*.json and *.md (BENCH_ARGS=--quick for a smoke run).
BENCH_ARGS ?=
bench: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m hmora_ds.bench all $(BENCH_ARGS)

# Mutation testing of the method math (docs/testing.md): not part of `make test` (about an hour
# on 2 cores from scratch; mutmut keeps its results in mutants/ and re-runs only what changed).
# MUTATE selects mutants by name pattern, e.g. MUTATE='hmora_ds.methods.himole.*' for one file.
MUTATE ?=
MUTATE_JOBS ?= 2
MUTATE_STAMP := $(VENV)/.installed-mutate
$(MUTATE_STAMP): $(STAMP)
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,analysis,mutate]"
	@touch $(MUTATE_STAMP)
mutate: $(MUTATE_STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTATE)
	$(PY) -m tests._mutation $(if $(MUTATE),--only '$(MUTATE)')

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache mutants .hypothesis
