# Every target installs what it needs first (idempotent). Python 3.11+.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= demo
# pytest-xdist: the test files spread over one process per core, at most 4 (each holds ~1 GB)
TEST_WORKERS ?= $(shell $(PY) -c "import os; print(min(4, len(os.sched_getaffinity(0))))")

.PHONY: demo test bench install sysdeps clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the versions this platform has as local wheels (see README)
	$(BIN)/pip install -q "torch>=2.1" "torchvision>=0.16"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

sysdeps:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { command -v apt-get >/dev/null && (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) || \
	    { echo "error: Fashion-MNIST missing: apt-get install dataset-fashion-mnist"; exit 2; }; }

demo: install sysdeps
	$(BIN)/python -m pretrain --preset demo --out $(OUT)/pretrain $(if $(wildcard $(OUT)/pretrain/checkpoint.pth),--resume,)
	$(BIN)/python -m evaluations.run_all --suite demo --executor local --ckpt $(OUT)/pretrain/checkpoint.pth --label "DeepCluster (ours, demo)" --results $(OUT)/results --cache $(OUT)/cache
	$(BIN)/python tables/render.py --results $(OUT)/results --out $(OUT)/tables --logs $(OUT)/pretrain --format all

test: install sysdeps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: install sysdeps
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(OUT) .pytest_cache
