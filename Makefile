# Enersis: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BROKER := $(PYTHON) deploy/rabbitmq/broker.py
PYTEST_ARGS ?=

.PHONY: test demo deps venv broker-start broker-stop definitions bench clean

deps:
	bash deploy/scripts/install-deps.sh

# pip's build chatter goes to .venv/pip.log; it is shown only when the install fails.
$(VENV)/.installed: pyproject.toml
	@echo "preparing the virtualenv in $(VENV) (log: $(VENV)/pip.log)"
	@$(PYTHON) -m venv $(VENV)
	@( $(PY) -m pip install --upgrade pip && $(PY) -m pip install -e '.[test,plot]' ) > $(VENV)/pip.log 2>&1 \
	  || { tail -40 $(VENV)/pip.log; echo "pip install failed; full log in $(VENV)/pip.log" >&2; exit 1; }
	@touch $@

venv: deps $(VENV)/.installed

# Installs what is missing, starts the private broker, runs pytest, stops the
# broker, and exits with pytest's status.
test: venv
	@$(BROKER) start
	@set +e; $(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; $(BROKER) stop; exit $$rc

# Installs what is missing, starts the private broker (unless one runs), runs a
# whole simulated cluster with a live view until its summary, then stops what it
# started.  E.g. make demo DEMO_ARGS="--nodes 4 --duration 60".
DEMO_ARGS ?=
demo: venv
	@started=0; if ! $(BROKER) status >/dev/null 2>&1; then $(BROKER) start || exit 1; started=1; fi; \
	set +e; $(VENV)/bin/enersis demo $(DEMO_ARGS); rc=$$?; \
	if [ $$started = 1 ]; then $(BROKER) stop; fi; exit $$rc

broker-start: venv
	$(BROKER) start

broker-stop:
	$(BROKER) stop

definitions: venv
	$(PY) -m enersis.common.topology > deploy/rabbitmq/definitions.json

clean:
	-$(BROKER) stop
	rm -rf $(VENV) .broker *.egg-info
