# Task runner for beach-rescue. `./run <recipe>` bootstraps .venv first; inside it, plain `just <recipe>`.
set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Token service + relay in one process, in-memory store, throwaway key, `dev` cohort enabled.
dev *ARGS:
    rescue dev {{ARGS}}

# Everything CI checks: lint, types, then the test suite.
test *ARGS: lint types
    pytest {{ARGS}}

# Only the test suite (pass pytest arguments, e.g. `just pytest tests/test_frames.py -x`).
pytest *ARGS:
    pytest {{ARGS}}

lint:
    ruff check rescue tests bench chaos soak
    ruff format --check rescue tests bench chaos soak

types:
    mypy

# Rewrite files with ruff's formatter and autofixes.
fmt:
    ruff format rescue tests bench chaos soak
    ruff check --fix rescue tests bench chaos soak
