# `make test` and `make demo` create .venv on first use, then run.
PY := .venv/bin/python
PIP := .venv/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg
export NO_MKDOCS_2_WARNING := 1

.PHONY: test test-threads demo lint docs bench conformance clean

$(PY): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PIP) install -q -c constraints.txt -e ".[dev,docs]"
	@touch $(PY)

# The suite, then the documentation site: a broken link, anchor or API reference fails `make test`.
test: $(PY)
	$(PY) -m pytest -n 2 --durations=15 tests probes
	.venv/bin/mkdocs build --strict --quiet --site-dir build/site

# `make test` gives each xdist worker its share of the cores (one thread each on 2 cores, see
# conftest.py). The tests that compare routes, row growth and batch shapes run again here in
# one process at torch's default thread count (every core): matrix kernels split work by
# thread count, so floats computed in another batch shape round differently, and every such
# comparison must hold either way.
THREAD_SENSITIVE := tests/engine/test_engine.py tests/engine/test_architectures.py tests/engine/test_rank.py \
	tests/engine/test_controls.py tests/engine/test_patch_check.py tests/engine/test_moe.py \
	tests/engine/test_hybrid.py tests/engine/test_expert_neurons.py
test-threads: $(PY)
	$(PY) -m pytest -p no:xdist -p no:randomly --durations=5 $(THREAD_SENSITIVE)

demo: $(PY)
	$(PY) -m neuronpatch.demo.run_demo
	$(PY) -m pytest probes -v -p no:cacheprovider

lint: $(PY)
	.venv/bin/ruff check src tests benchmarks tools
	.venv/bin/mypy

# The documentation site (mkdocs.yml, pages under docs/); --strict turns a broken link, a
# missing page or an API reference that does not resolve into a failure.
docs: $(PY)
	.venv/bin/mkdocs build --strict --site-dir build/site
	@echo "the site is in build/site (mkdocs serve to browse it while editing)"

conformance: $(PY)
	.venv/bin/neuronpatch conformance --out docs/conformance.md

bench: $(PY)
	$(PY) benchmarks/bench_engine.py
	$(PY) benchmarks/bench_controls.py

clean:
	rm -rf .venv .neuronpatch build site src/*.egg-info
