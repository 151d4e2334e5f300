# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install, run the main job on the embedded synthetic dataset
#   make test   - create .venv, install, run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
RUNS    ?= runs
# Two pytest-xdist workers: every test runs on one torch thread (tests/conftest.py), so a single pytest process
# keeps one of CI's two cores idle. PYTEST_ARGS= (empty) runs the suite in one process.
PYTEST_ARGS ?= -n 2

.PHONY: install test demo experiment search-eval clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install only when the project metadata changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# the plain `nnictl` of this venv: 127.0.0.1 only, NNI's experiment index under runs/ (strategies/nni_local.py)
	$(BIN)/python -m strategies.nni_local install-hook
	# compile the C++ decomposition kernels now (cached in $$PAIF_EXT_DIR or ~/.cache/paif_ext by source hash), not
	# inside the first search trial or test; without a compiler it says so and the pure-PyTorch path is used
	$(BIN)/python -c 'from search_space.cpp_ext import main; raise SystemExit(main())'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# data -> NNI search (search.yml) -> genotype -> warm start -> AAT retrain -> paif/strong evaluation on 2 CPU cores;
# each run writes a fresh runs/demo/demo-<time>/ and ends by printing the path of its report.md.
demo: install
	VENV=$(VENV) bash scripts/demo.sh

# the robustness experiment of the README (no AAT / plain AT / AAT / AAT uniform-eps x 3 seeds, IR-only, VIS-only;
# several hours on 2 CPU cores; resumable per arm: rerun the same command after an interruption)
experiment: install
	OMP_NUM_THREADS=1 $(BIN)/python -m trainer.experiment --out $(RUNS)/experiment

# search quality (README "Search quality"): 3 searches (robust, clean, robust seed 1) + 6 random genotypes, both
# searched ones, paif and a hand-made baseline retrained with AAT from one warm start, evaluated clean and under
# strong; resumable per arm and per search. SEARCH_EVAL_ARGS=--tiny: an end-to-end check at toy size
search-eval: install
	OMP_NUM_THREADS=1 $(BIN)/python -m trainer.experiment --config configs/search_eval.yaml --out $(RUNS)/search_eval \
		$(SEARCH_EVAL_ARGS)

clean:
	rm -rf $(VENV) $(RUNS) data/synthetic
