# recurrent_depth: `make demo` runs the main job on the bundled defaults, `make test` runs the tests.
# The virtual environment is built from nothing: torch is pinned to the CPU wheel, transformers in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint test-compat clean readme-figure

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rdepth demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider tests

# The README's picture of latent thought (rdepth inspect): `make readme-figure MODEL=<checkpoint folder>`.
INSPECT_PROMPT ?= 6-3+7-5-7+9-1*2-4+0+1+1=0
readme-figure: $(STAMP)
	$(VENV)/bin/rdepth inspect $(if $(MODEL),--model $(MODEL)) --prompt "$(INSPECT_PROMPT)" --num-steps 64 --out build/inspect
	mkdir -p docs/images && cp build/inspect/overview.png docs/images/inspect-overview.png

# The other supported transformers major version, in its own venv, on the tests that touch transformers.
COMPAT_TRANSFORMERS ?= 4.57.6
test-compat:
	$(PYTHON) -m venv .venv-compat
	.venv-compat/bin/pip install -q torch==2.13.0
	.venv-compat/bin/pip install -q -e ".[dev]" "transformers==$(COMPAT_TRANSFORMERS)"
	.venv-compat/bin/python -m pytest -q -p no:cacheprovider tests/model

clean:
	rm -rf $(VENV) .venv-compat build *.egg-info
