# longlived tasks. `just --list` shows them. Tools come from ./.venv (see README).
export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")

# Show the recipes.
default:
    @just --list

# Regenerate longlived/_proto from proto/ (betterproto2) and its copy in longlived/proto/.
codegen:
    python codegen/generate.py

# ruff lint and format check.
lint:
    ruff check .
    ruff format --check .

# mypy --strict over the package, the tests and the examples.
typecheck:
    mypy

# The test suite.
test *ARGS:
    pytest {{ARGS}}

# The whole gate: lint, typecheck, tests.
gate: lint typecheck test

# The demo: server plus ten clients (Ctrl-C to stop).
demo *ARGS:
    longlived demo {{ARGS}}
