# lrcnn quick start:
#   make run    set up .venv (first time: downloads torch + CUDA wheels, several GB) and run the main job
#   make test   set up .venv and run the test suite
# The environment is (re)installed only when pyproject.toml changes (stamp: .venv/.installed).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test setup clean

run: $(STAMP)
	$(BIN)/planner solve --model resnet50 --budget 8GB

test: $(STAMP)
	$(BIN)/python -m pytest -q

setup: $(STAMP)

# torch/torchvision stay unpinned on purpose: pip must take a matching pair from the registry.
# (Some machines carry a local CPU-only torch wheel in pip's find-links with no torchvision build
# for it; pinning torch to that version breaks `import torchvision`.)
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	@$(BIN)/python -c "import torch, torchvision" || { \
	  echo "error: 'import torchvision' fails in $(VENV): torch and torchvision do not match" \
	       "(pip probably took a local CPU-only torch wheel); do not pin torch, then: rm -rf $(VENV) && make setup" >&2; \
	  exit 1; }
	@touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
