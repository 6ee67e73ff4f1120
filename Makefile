# The two commands: `make demo` and `make test`. Both create .venv when missing and are idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
# DeepSpeed's JIT-built ops live with the venv: two checkouts sharing ~/.cache would rebuild in turn
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

TOY := data/toy
DEMO_RUN := runs/demo
DEMO_SETS := $(TOY)/vqa_image_test $(TOY)/vqa_video_test $(TOY)/vqa_image_compositional
# The demo's toy world (README, "What the demo shows"): 10x the default image VQA and captions and
# 4x the videos, so 1300 steps see (almost) no picture twice, and distractors in four extra colours
# in the training scenes; ~40 s on 2 cores. tools/ablate.py's `demo` grid uses the same sizes.
TOY_FLAGS := --n-image 40000 --n-video 2400 --n-vqa-train 60000 --n-video-vqa-train 6000 \
	--extra-colors white,pink,cyan,brown

.PHONY: test test-unit lint install demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "$$BUILD_SHM_OP" || echo "warning: DeepSpeed's shm op did not build now; the first run will retry" >&2
	touch $(STAMP)

# On CPU, DeepSpeed compiles its shared-memory all-reduce op at the first launch (about 3 minutes
# on 2 cores, once per venv): do it at install time so that `make demo` times training, not gcc.
export BUILD_SHM_OP := from deepspeed.accelerator import get_accelerator as a; \
b = a().create_op_builder('ShareMemCommBuilder'); b is None or b.load(verbose=False)

# pytest exits 5 when it collects no test: that is a broken suite here, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# The house's habits: lint and format (ruff), the import contracts and no cycles (import-linter,
# contracts in pyproject.toml), types of the model and the configuration (mypy), module and function
# sizes, and docs/config.md current with the dataclasses.
lint: $(STAMP)
	$(BIN)/ruff check fusion tools tests
	$(BIN)/ruff format --check fusion tools tests
	$(BIN)/lint-imports
	$(BIN)/mypy fusion/model fusion/config fusion/schema.py fusion/__init__.py
	$(BIN)/python tools/check_sizes.py
	$(BIN)/python tools/config_reference.py --check

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# Toy world -> 2-rank DeepSpeed training on CPU -> toy-VQA evaluation -> table vs chance and blind.
# Re-running resumes or skips what is done (toy data kept, training resumes from its checkpoint).
# The report ends with the time since make started (the install included when it ran).
DEMO_T0 := $(shell date +%s)
demo: $(STAMP)
	$(BIN)/fusion-data toy --output $(TOY) $(TOY_FLAGS)
	$(BIN)/deepspeed --num_gpus 2 --module fusion.train --config configs/demo.yaml run.dir=$(DEMO_RUN)
	$(BIN)/fusion-eval --run $(DEMO_RUN) --vqa $(DEMO_SETS) --no-progress > $(DEMO_RUN)/eval.log
	$(BIN)/python tools/demo_report.py --run $(DEMO_RUN) --vqa $(DEMO_SETS) --started $(DEMO_T0)

clean:
	rm -rf $(VENV) runs .pytest_cache
