# The two commands of the README: `make demo` (the main job on bundled demo data) and `make test`.
# Both create or reuse .venv in the repo and install the pinned environment; both are safe to re-run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_run

.PHONY: install demo test gpu-check lint lock clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the bundled demo data: Tahoe-format demo data -> MDS -> train -> HF export -> evaluate.
# Each step resumes where a killed run stopped and, once finished, is skipped on a re-run (README, Reliability).
demo: $(STAMP)
	$(BIN)/python data_prep/make_demo_data.py --out $(DEMO_DIR)/tahoe --cells 4000
	$(BIN)/python data_prep/tahoe_to_mds.py --input $(DEMO_DIR)/tahoe/data \
		--gene-metadata $(DEMO_DIR)/tahoe/gene_metadata.parquet \
		--sample-metadata $(DEMO_DIR)/tahoe/sample_metadata.parquet \
		--out $(DEMO_DIR)/mds --valid-fraction 0.1
	PATH=$(abspath $(BIN)):$$PATH composer -n 1 launch/train.py yamls/demo_cpu.yaml \
		data.streams.demo.remote=$(DEMO_DIR)/mds trainer.save_folder=$(DEMO_DIR)/checkpoints
	$(BIN)/ddsc export --checkpoint $(DEMO_DIR)/checkpoints --out $(DEMO_DIR)/hf
	$(BIN)/ddsc evaluate --model $(DEMO_DIR)/hf --data $(DEMO_DIR)/mds --out $(DEMO_DIR)/report \
		--max-cells 400 --generate-cells 128 --steps 16

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# On a GPU node, before a long job: a few training steps per engine and precision, with a table (benchmarks/).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Re-resolve the newest versions that pyproject.toml allows and pin them (commit the result).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade "pip>=24"
	.lock-venv/bin/python -m pip install --quiet -e ".[dev]"
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e' > requirements/constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
