# The README's two commands are `make demo` and `make test`; everything they
# need (virtual environments, pinned dependencies) is created here.
#
#   make demo         set up the workstation venv and run the end-to-end bench demo
#   make test         set up both venvs and run the whole suite (what CI runs)
#   make test-fast    everything under the workstation Python only
#   make test-device  device suite only, under Python 3.6 (JetPack 4.6 pins)
#   make soak         long reliability runs (not in CI)

PYTHON ?= python3
VENV := .venv
VENV36 := .venv36
# Python 3.6 stands in for the Jetson's 3.6.9; found on PATH or under pyenv.
PYTHON36 ?= $(shell scripts/find-python36.sh)
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-device static-check soak bench clean

$(VENV)/.installed: setup.py scripts/constraints-workstation.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c scripts/constraints-workstation.txt -e '.[train,test,lab]' vermin pyflakes
	touch $@

$(VENV36)/.installed: setup.py scripts/constraints-device.txt
	@test -n "$(PYTHON36)" && test -x "$(PYTHON36)" || { echo "no Python 3.6 found (set PYTHON36=...)"; exit 3; }
	$(PYTHON36) -m venv $(VENV36)
	$(VENV36)/bin/pip install --quiet --upgrade pip==21.3.1
	$(VENV36)/bin/pip install --quiet -r scripts/constraints-device.txt
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/neurohand demo

# The device suite runs once, under Python 3.6 (what the Jetson runs), and writes down the tests it
# had to skip (comparisons with scipy or ONNX Runtime, absent there); the workstation run then takes
# tests/workstation and just those device tests.  Without Python 3.6 the workstation run takes all.
DEVICE_SKIPS := build/device-suite-skips.txt

test: $(VENV)/.installed static-check
	@mkdir -p build && rm -f $(DEVICE_SKIPS)
	$(MAKE) test-device PYTEST_ARGS="$(PYTEST_ARGS) --record-skips=$(CURDIR)/$(DEVICE_SKIPS)"
	@if [ -f $(DEVICE_SKIPS) ]; then \
	  echo "workstation suite, with the $$(wc -l < $(DEVICE_SKIPS)) device tests Python 3.6 skipped"; \
	  $(VENV)/bin/python -m pytest -q tests --device-tests-from=$(DEVICE_SKIPS) $(PYTEST_ARGS); \
	else $(VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS); fi

# Everything under the workstation Python, device tests included (quick to start, no 3.6 needed).
test-fast: $(VENV)/.installed static-check
	$(VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS)

static-check: $(VENV)/.installed
	$(VENV)/bin/vermin -q -t=3.6- --no-tips --violations --eval-annotations decoder firmware_bridge deploy

# The device suite: the installed package (not the source tree) under Python 3.6
# with JetPack's numpy, so a 3.7+ construct or a torch import fails here.
test-device:
	@if [ -z "$(PYTHON36)" ] || [ ! -x "$(PYTHON36)" ]; then \
	  if [ -n "$$REQUIRE_PY36" ]; then echo "device suite: no Python 3.6 found, and REQUIRE_PY36 is set"; exit 1; fi; \
	  echo "device suite SKIPPED: no Python 3.6 found (set PYTHON36=/path/to/python3.6)"; exit 0; fi
	$(MAKE) $(VENV36)/.installed
	$(VENV36)/bin/pip install --quiet --no-deps --force-reinstall .
	$(VENV36)/bin/python -m pytest -q -p no:cacheprovider tests/device $(PYTEST_ARGS)

soak: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m soak tests --run-soak

bench: $(VENV)/.installed
	$(VENV)/bin/neurohand bench all

clean:
	rm -rf $(VENV) $(VENV36) build *.egg-info .pytest_cache
