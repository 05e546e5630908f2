# zsad: set-up commands.
#   make demo        create .venv, install zsad, generate a synthetic dataset, run the smoke job on a local Ray
#   make test        create/update .venv and run the whole test suite (what .ci/run calls), on as many
#                    pytest-xdist workers as the machine has cores (a module's tests stay on one worker)
#   make test-fast   create/update .venv and run the unit tests only (tests/unit: no local Ray, no CLI
#                    runs; under a minute on 2 cores)
PYTHON ?= python3
VENV   ?= .venv
# torch/torchvision pinned to what this project's machines serve; override for other platforms,
# e.g. make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# pytest-xdist workers: auto = one per core; make test WORKERS=0 runs in one process
WORKERS ?= auto
PY  := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.zsad-installed

.PHONY: demo test test-fast lint venv bench clean reference-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_SPEC)
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/zsad demo --output demo-output --data demo-data

# ruff's settings are in pyproject.toml ([tool.ruff]); the tree must pass them before the tests run
lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q -n $(WORKERS) --dist loadscope --durations=30 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) tests/unit

# zsad against each reference repository's own code (benchmarks/reference/README.md); outside `make test`.
# APRILGAN / MUSC: checkouts (or git directories) of github.com/ByChelsea/VAND-APRIL-GAN and xrli-U/MuSc;
# ANOMALIB / OPEN_CLIP_224: anomalib 2.7's wheel (or checkout) and open_clip_torch 2.24.0's (pip download --no-deps).
APRILGAN ?=
MUSC ?=
ANOMALIB ?=
OPEN_CLIP_224 ?=
reference-check: $(STAMP)
	@test -n "$(APRILGAN)" || { echo "reference-check: give APRILGAN=/path/to/VAND-APRIL-GAN (a checkout or git dir)"; exit 2; }
	@test -n "$(MUSC)" || { echo "reference-check: give MUSC=/path/to/MuSc (a checkout or git dir)"; exit 2; }
	@test -n "$(ANOMALIB)" -a -n "$(OPEN_CLIP_224)" || { echo "reference-check: give ANOMALIB=anomalib-2.7.0-py3-none-any.whl OPEN_CLIP_224=open_clip_torch-2.24.0-py3-none-any.whl"; exit 2; }
	@test -n "$(FADE)" -a -n "$(GEM)" -a -n "$(OPENCV)" -a -n "$(EINOPS)" || { echo "reference-check: give FADE=/path/to/BMVC-FADE GEM=gem_torch-1.0.1-py3-none-any.whl OPENCV=opencv_python_headless-4.*.whl EINOPS=einops-*.whl"; exit 2; }
	$(PY) benchmarks/reference/aprilgan_check.py --aprilgan $(APRILGAN)
	$(PY) benchmarks/reference/musc_forward_check.py --musc $(MUSC)
	$(PY) benchmarks/reference/winclip_check.py --anomalib $(ANOMALIB) --open-clip $(OPEN_CLIP_224)
	$(PY) benchmarks/reference/fade_check.py --fade $(FADE) --gem $(GEM) --open-clip $(OPEN_CLIP_224) --opencv $(OPENCV) --einops $(EINOPS)
	$(PY) benchmarks/musc_official_compare.py $$(if [ -d "$(MUSC)/.git" ] || [ ! -f "$(MUSC)/HEAD" ]; then echo --musc-repo; else echo --musc-git-dir; fi) $(MUSC)

bench: $(STAMP)
	$(PY) benchmarks/bench_cpu_throughput.py

clean:
	rm -rf demo-output demo-data .pytest_cache
