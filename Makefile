# `make test` and `make demo` create .venv on first use, then run.
PY := .venv/bin/python
PIP := .venv/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: test demo lint bench conformance clean

$(PY): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	@touch $(PY)

test: $(PY)
	$(PY) -m pytest -n 2 --durations=15 tests probes

demo: $(PY)
	$(PY) -m neuronpatch.demo.run_demo
	$(PY) -m pytest probes -v -p no:cacheprovider

lint: $(PY)
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/mypy

conformance: $(PY)
	.venv/bin/neuronpatch conformance --out docs/conformance.md

bench: $(PY)
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_controls.py

clean:
	rm -rf .venv .neuronpatch build src/*.egg-info
