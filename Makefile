# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Everything installs from this repository's own files into .venv (Python 3.11: the local torch
# wheel is cp311). torch is installed first and pinned, so nothing pulls CUDA packages.
PY ?= $(shell command -v python3.11 || echo $$HOME/.pyenv/versions/3.11.7/bin/python3.11)
VENV := .venv
VPY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e ".[transformers,collector,dev]"
	touch $@

demo: $(VENV)/.installed
	cd /tmp && rm -rf prism-demo && mkdir prism-demo && cd prism-demo && \
	  $(CURDIR)/$(VENV)/bin/prism-otel run -- $(CURDIR)/$(VPY) $(CURDIR)/examples/cb_demo.py

# Extra environments some test tiers need (each builds from this repo's files; see tests/README.md).
EXTRA_ENVS :=

test: $(VENV)/.installed $(EXTRA_ENVS)
	$(VPY) -m pytest -q tests

test-fast: $(VENV)/.installed
	$(VPY) -m pytest -q tests -m "not vllm and not slow"

clean:
	rm -rf $(VENV) .venv-* prism-out
