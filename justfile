# Task runner for beach-rescue. `./run <recipe>` bootstraps .venv first; inside it, plain `just <recipe>`.
set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Token service + relay in one process, in-memory store, throwaway key, `dev` cohort enabled.
dev *ARGS:
    rescue dev {{ARGS}}

# Everything CI checks: the lock, lint, types, deploy bundle validators, then the test suite.
test *ARGS: lock-check lint types deploy-check
    pytest {{ARGS}}

# Refresh requirements/*.txt (hash-pinned) from pyproject.toml; `just lock --upgrade` moves every pin.
lock *ARGS:
    scripts/lock {{ARGS}}

# Fail when pyproject.toml and requirements/ disagree (someone added a dependency without `just lock`).
lock-check:
    scripts/check-lock

# Runtime dependencies at their lowest (requirements/lowest.txt) or newest allowed versions, in a
# clean venv with the built wheel: protocol, tokens, messages, vectors and a real share/join session.
range KIND *ARGS:
    scripts/range-check {{KIND}} {{ARGS}}

# Only the test suite (pass pytest arguments, e.g. `just pytest tests/test_frames.py -x`).
pytest *ARGS:
    pytest {{ARGS}}

# ruff lint + format check (the rules are in pyproject.toml); the format check covers the docs'
# Python code blocks too, so an example a reader copies is formatted like the code.
lint:
    ruff check rescue tests bench chaos soak setup.py
    ruff format --check .

# mypy, strict on rescue/.
types:
    mypy

# Container, workflows, Prometheus rules (promtool), Grafana, ECS and Kubernetes manifests.
deploy-check:
    scripts/validate-deploy

# Rewrite files with ruff's formatter and autofixes.
fmt:
    ruff format .
    ruff check --fix rescue tests bench chaos soak

# The browser peer's npm dependencies, exactly as locked (web/package-lock.json).
web-deps:
    npm ci --prefix web --no-audit --no-fund

# Build the /join/ page bundle into rescue/tokenservice/web/ (commit the result; CI checks it).
web: web-deps
    node web/build.mjs

# The browser client's own tests under node (vectors, core); pytest runs them too.
web-test: web-deps
    cd web && node --test test/

# Benchmarks: this relay vs raw TCP and websockets relays, in one run (see docs/perf/README.md).
bench *ARGS:
    python -m bench.run {{ARGS}}

# Chaos: a local fleet under injected faults; zero bytes lost, >= 99.5 % reconnects (docs/perf/chaos.md).
chaos *ARGS:
    python chaos/run.py {{ARGS}}

# Incident drill: a fleet + a real Prometheus (Debian `prometheus`) with the shipped rules; a fallback
# spike, the runbook's pause/drain/resume, missing telemetry; every step timed (docs/operations/drills.md).
drill *ARGS:
    python chaos/drill.py {{ARGS}}

# Soak: 24 h by default (`just soak --duration 2h`); memory, fds and tasks must stay flat (docs/perf/soak.md).
soak *ARGS:
    python soak/run.py {{ARGS}}
