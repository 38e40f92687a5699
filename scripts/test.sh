#!/usr/bin/env bash
# README command 2 (and what CI runs): install if needed, lint, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Third-party GPTQ loaders that our checkpoints are checked against, and GemLite (test-only, see the file).
.venv/bin/python -c 'import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ("gptqmodel", "gemlite"))))' 2>/dev/null \
  || .venv/bin/python -m pip install -q --no-deps -r tests/requirements-thirdparty.txt
# axe-core for the web page's accessibility check (tests/ui; skipped there when node/npm are missing).
if command -v npm >/dev/null; then npm ci --prefix tests/ui --no-audit --no-fund --silent; fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
