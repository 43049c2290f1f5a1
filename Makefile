# keeper — set-up, demo and tests. Needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test test-fast install lint bench docs constraints clean systemd-check

# The venv is (re)built whenever the dependency pins change. `make install` is the production
# set (no test extras); pip stays the venv's own (ensurepip's), never upgraded to an unpinned one.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	rm -f $(TEST_STAMP) $(DOCS_STAMP)
	touch $(STAMP)

# The test extras (pytest, ruff, mypy...), for `make test` and `make lint` only.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m keeper.cli.demo

# Everything, in parallel: most tests wait on sockets and child processes, so two cores carry
# more workers than cores. The test hosts run one after another on one worker (loadgroup).
TEST_WORKERS ?= 3
FAST := not (db or e2e or hosts or browser or slow)
test: $(TEST_STAMP) lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The edit loop: no child process, no PostgreSQL, no browser (tests/conftest.py, "test tiers").
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "$(FAST)"

lint: $(TEST_STAMP)
	$(BIN)/ruff check keeper bench tests examples
	$(BIN)/mypy
	$(BIN)/mypy examples/website/app.py

# The documentation site (docs/, mkdocs.yml) into site/: --strict makes every warning, a
# broken link or anchor included, an error. Its extras (MkDocs, Material) have a stamp of their own.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The benchmarks (bench/, beside the package, not in the wheel), from this checkout; arguments
# through ARGS, e.g. make bench ARGS="hosts --grants-per-host 100".
bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

# Keeps the file's leading comment lines (pip freeze writes none).
constraints: $(TEST_STAMP) $(DOCS_STAMP)
	{ grep '^#' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -vi '^keeper'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) var/demo .pytest_cache site

# Install the systemd units for this checkout (run as root). The checkout should live outside
# /home and /root (the units use ProtectHome=yes), e.g. in /opt/keeper. Also: keeper-ctl (runs a
# keeper command as the service), the groups keeper-avatars and keeper-api with
# /var/lib/keeper-avatars (docs/operators/avatars.md) and /run/keeper-api (the API's unix socket),
# /etc/keeper/keeper.toml (avatar_dir set to that directory), keeper.env and api-keys if missing.
UNITDIR ?= /etc/systemd/system
CONFDIR ?= /etc/keeper
BINDIR ?= /usr/local/bin
AVATARDIR := /var/lib/keeper-avatars
.PHONY: install-systemd
install-systemd: $(STAMP)
	@# The units run keeper from this checkout as their own user: every directory on the way
	@# must let other users in (a checkout in a 0700 directory fails at start with 203/EXEC).
	@if [ -z "$(DESTDIR)" ]; then d="$(CURDIR)"; while [ "$$d" != "/" ]; do \
	  case "$$(stat -c %A "$$d")" in *x|*t) ;; *) echo "install-systemd: $$d (mode $$(stat -c %a "$$d")) does not let other users in, so the service could not run keeper from $(CURDIR): chmod o+x it, or move the checkout (e.g. to /opt/keeper)" >&2; exit 1;; esac; \
	  d=$$(dirname "$$d"); done; fi
	install -d -m 0755 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)/etc/tmpfiles.d $(DESTDIR)/etc/sysusers.d
	for unit in keeper.service keeper-sweep.service keeper@.service keeper-api.service; do \
	  sed 's#/opt/keeper#$(CURDIR)#g' systemd/$$unit > $(DESTDIR)$(UNITDIR)/$$unit; \
	  chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit; \
	done
	sed 's#/opt/keeper#$(CURDIR)#g' systemd/keeper-ctl > $(DESTDIR)$(BINDIR)/keeper-ctl
	chmod 0755 $(DESTDIR)$(BINDIR)/keeper-ctl
	install -m 0644 systemd/keeper.sysusers $(DESTDIR)/etc/sysusers.d/keeper.conf
	install -m 0644 systemd/keeper.tmpfiles $(DESTDIR)/etc/tmpfiles.d/keeper.conf
	install -d -m 0755 $(DESTDIR)$(CONFDIR) $(DESTDIR)$(CONFDIR)/secrets
	test -e $(DESTDIR)$(CONFDIR)/keeper.toml || \
	  sed 's#^avatar_dir = .*#avatar_dir = "$(AVATARDIR)"#' config/keeper.toml > $(DESTDIR)$(CONFDIR)/keeper.toml
	chmod 0644 $(DESTDIR)$(CONFDIR)/keeper.toml
	test -e $(DESTDIR)$(CONFDIR)/keeper.env || install -m 0600 systemd/keeper.env.example $(DESTDIR)$(CONFDIR)/keeper.env
	@# Read by systemd alone (LoadCredential=), as root: no other user needs it.
	test -e $(DESTDIR)$(CONFDIR)/api-keys || (umask 077 && \
	  sed 's#/opt/keeper#$(CURDIR)#g' systemd/api-keys.example > $(DESTDIR)$(CONFDIR)/api-keys)
	if [ -z "$(DESTDIR)" ]; then \
	  { getent group keeper-avatars && getent group keeper-api; } >/dev/null || systemd-sysusers /etc/sysusers.d/keeper.conf 2>/dev/null || \
	    for g in keeper-avatars keeper-api; do getent group $$g >/dev/null || groupadd --system $$g; done; \
	  systemd-tmpfiles --create /etc/tmpfiles.d/keeper.conf 2>/dev/null || { \
	    install -d -m 2770 -g keeper-avatars $(AVATARDIR) && install -d -m 2770 -g keeper-api /run/keeper-api; }; \
	fi
	if [ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed; next: put each AppSecret in $(CONFDIR)/secrets/<appid> (mode 0600), edit $(CONFDIR)/keeper.toml, then: systemctl enable --now keeper"
	@echo "the application API: add the line of '$(CURDIR)/$(BIN)/keeper api-key --name NAME --scopes tokens,grants,read' to $(CONFDIR)/api-keys, then: systemctl enable --now keeper-api"

# keeper under a real systemd: boots a Debian bookworm container (systemd-nspawn; the tree is
# cached in $(SYSTEMD_CHECK_CACHE)) and runs the service's life cycle in it. Root only.
SYSTEMD_CHECK_CACHE ?= /var/cache/keeper-systemd-check
systemd-check: $(STAMP)
	SYSTEMD_CHECK_CACHE=$(SYSTEMD_CHECK_CACHE) PYTHON=$(CURDIR)/$(BIN)/python bash tests/system/systemd-check
