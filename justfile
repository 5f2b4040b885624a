# Task runner for beach-rescue. `./run <recipe>` bootstraps .venv first; inside it, plain `just <recipe>`.
set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Token service + relay in one process, in-memory store, throwaway key, `dev` cohort enabled.
dev *ARGS:
    rescue dev {{ARGS}}

# Everything CI checks: lint, types, deploy bundle validators, then the test suite.
test *ARGS: lint types deploy-check
    pytest {{ARGS}}

# Only the test suite (pass pytest arguments, e.g. `just pytest tests/test_frames.py -x`).
pytest *ARGS:
    pytest {{ARGS}}

lint:
    ruff check rescue tests bench chaos soak
    ruff format --check rescue tests bench chaos soak

types:
    mypy

# Container, workflows, Prometheus rules (promtool), Grafana, ECS and Kubernetes manifests.
deploy-check:
    scripts/validate-deploy

# Rewrite files with ruff's formatter and autofixes.
fmt:
    ruff format rescue tests bench chaos soak
    ruff check --fix rescue tests bench chaos soak
