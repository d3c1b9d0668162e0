# lamina: two commands on a fresh machine — `make demo` and `make test`.
# Everything runs from .venv, made by `make venv` (needs python3 with venv/ensurepip;
# on Debian/Ubuntu: apt-get install python3-venv).

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
RUFF       := $(VENV)/bin/ruff
LINT_PATHS ?= src tests bench scripts stress fuzz
PYTEST_ARGS ?=
DEMO_ARGS  ?=
FUZZ_SECONDS ?= 300

.PHONY: help venv system-deps demo test lint bench stress proto clean distclean

help:
	@echo "make demo    install into $(VENV) and run the demo on the default driver"
	@echo "make test    as root, installs the test tools (scripts/system-deps.sh); ruff; the whole suite"
	@echo "make lint    ruff only"
	@echo "make bench   every bench/bench_*.py in full"
	@echo "make stress  every stress/ harness in full, then the slow tests (pytest -m slow)"
	@echo "make proto   regenerate the containerd snapshotter's gRPC modules"
	@echo "make clean   caches and build output; distclean also removes $(VENV)"

# The stamp re-installs when pyproject.toml changes (new pins) or the C speedups' source
# does (pip builds lamina.archive._speedups in place; without a compiler it warns, and
# lamina runs its pure-Python code), not on every run.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard src/lamina/archive/_speedups/*)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

demo: venv
	$(PY) scripts/demo.py $(DEMO_ARGS)

# The containerd snapshotter's gRPC modules, from src/lamina/snapshotter/proto/*.proto
proto: venv
	PY=$(abspath $(PY)) sh scripts/gen-proto.sh

lint: venv
	$(RUFF) check $(LINT_PATHS)

# The system packages the tests need (dockerd, containerd, mkfs.xfs, ...): installed as
# root with apt-get, otherwise listed with the tests they cost. LAMINA_NO_SYSTEM_DEPS=1
# skips the step. The list is scripts/system-deps.sh, the same one .ci/run uses.
system-deps:
	@PYTHON=$(PYTHON) bash scripts/system-deps.sh install

# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
# system-deps comes first: it may install python3-venv, which venv needs.
test: system-deps venv
	$(RUFF) check $(LINT_PATHS)
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

bench: system-deps venv
	@set -e; found=0; for f in bench/bench_*.py; do \
	  [ -e "$$f" ] || continue; found=1; \
	  echo "== $$f"; $(PY) "$$f"; \
	done; \
	[ $$found -eq 1 ] || echo "make bench: no bench/bench_*.py yet"

# Long-running checks: every stress/*.py harness in full (python -m stress.NAME), then
# the tests marked slow. Having no slow tests yet is not a failure here.
STRESS_ARGS ?=
stress: system-deps venv
	@set -e; for f in stress/*.py; do \
	  name=$$(basename "$$f" .py); [ "$$name" != __init__ ] && [ -e "$$f" ] || continue; \
	  echo "== stress.$$name"; $(PY) -m "stress.$$name" $(STRESS_ARGS); \
	done
	@echo "== fuzzing the tar reader and apply path for $(FUZZ_SECONDS) s (findings in fuzz/findings/)"
	@mkdir -p fuzz/findings && PYTHONPATH=. $(PY) -m fuzz.corpus fuzz/findings/corpus >/dev/null
	PYTHONPATH=. $(PY) fuzz/fuzz_apply.py -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
	  -artifact_prefix=fuzz/findings/ fuzz/findings/corpus
	@echo "== a million empty tar entries (bounded time and memory)"
	LAMINA_FLOOD_ENTRIES=1000000 $(PY) -m pytest -q tests/integration/test_hostile_corpus.py -k many_empty_entries
	@rc=0; LAMINA_TEST_SLOW=1 $(PY) -m pytest -m slow $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make stress: no tests marked slow"; exit 0; fi; \
	exit $$rc

clean:
	rm -rf build dist bench/out .pytest_cache .ruff_cache .hypothesis
	find src -name '*.so' -delete
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) src/*.egg-info
