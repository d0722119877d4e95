# Set-up, run and test on a fresh Debian machine. Every target installs what
# it needs first, so `make run` and `make test` work from a clean clone.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STATE   ?= $(CURDIR)/.run
DEB_PKGS := python3-venv memcached postfix postfix-lmdb postgrey nutcracker

.PHONY: deps sysdeps venv run test lint bench clean

sysdeps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	  for s in memcached postfix postgrey nutcracker; do \
	    $$SUDO systemctl disable --now $$s >/dev/null 2>&1 || true; done; \
	fi

$(PY):
	python3 -m venv $(VENV)

venv: $(PY)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -m pip install -q -e '.[dev]'

deps: sysdeps venv

run: deps
	@$(PY) -m policyd.devrun --state $(STATE)

test: deps
	$(PY) -m pytest -q

lint: deps
	$(VENV)/bin/ruff check memtable policyd tests bench
	$(VENV)/bin/mypy

bench: deps
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) $(STATE) .pytest_cache .mypy_cache .ruff_cache
