# keeper — set-up, demo and tests. Needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench constraints clean

# The venv is (re)built whenever the dependency pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m keeper.demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check keeper tests
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/keeper bench

constraints:
	$(BIN)/python -m pip freeze --exclude-editable | grep -vi '^keeper' > constraints.txt

clean:
	rm -rf $(VENV) var/demo .pytest_cache

# Install the systemd units for this checkout (run as root). The checkout should live outside
# /home and /root (the units use ProtectHome=yes), e.g. in /opt/keeper.
UNITDIR ?= /etc/systemd/system
CONFDIR ?= /etc/keeper
.PHONY: install-systemd
install-systemd: $(STAMP)
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	for unit in keeper.service keeper-sweep.service keeper@.service; do \
	  sed 's#/opt/keeper#$(CURDIR)#g' systemd/$$unit > $(DESTDIR)$(UNITDIR)/$$unit; \
	  chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit; \
	done
	install -d -m 0755 $(DESTDIR)$(CONFDIR) $(DESTDIR)$(CONFDIR)/secrets
	test -e $(DESTDIR)$(CONFDIR)/keeper.toml || install -m 0644 config/keeper.toml $(DESTDIR)$(CONFDIR)/keeper.toml
	test -e $(DESTDIR)$(CONFDIR)/keeper.env || install -m 0600 systemd/keeper.env.example $(DESTDIR)$(CONFDIR)/keeper.env
	if [ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; next: put each AppSecret in $(CONFDIR)/secrets/<appid> (mode 0600), edit $(CONFDIR)/keeper.toml, then: systemctl enable --now keeper"
