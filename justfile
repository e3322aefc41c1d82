# longlived tasks. `just --list` shows them. Tools come from ./.venv (see README).
export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")

# Show the recipes.
default:
    @just --list

# Regenerate longlived/_proto and its packaged copy longlived/proto/ from proto/, and the
# examples' messages (betterproto2).
codegen:
    python codegen/generate.py
    python -m longlived.codegen --out examples/inventory/_proto examples/inventory/inventory.proto

# ruff lint and format check.
lint:
    ruff check .
    ruff format --check .

# mypy --strict over the package, the tests, the examples and the docs' hooks.
typecheck:
    mypy

# The test suite.
test *ARGS:
    pytest {{ARGS}}

# The documentation site, into site/ (warnings are errors).
docs:
    NO_MKDOCS_2_WARNING=1 mkdocs build --strict

# The whole gate: lint, typecheck, docs, tests.
gate: lint typecheck docs test

# The demo: server plus ten clients (Ctrl-C to stop).
demo *ARGS:
    longlived demo {{ARGS}}

# Chaos: every fault kind (kill -9, SIGSTOP, drain, black holes, cuts, replicas, Redis),
# RUNS runs each, one line of figures per kind.
chaos RUNS="5":
    python -m tests.chaos.run --runs {{RUNS}}

# Soak: 100,000 subscribe/unsubscribe cycles and a week of a 1/s feed at 5,000 events/s;
# the server's RSS, fds and tasks back to baseline. Flags: `just soak --cycles 2000`.
soak *ARGS:
    python -m tests.prove.run soak {{ARGS}}

# Load: 10,000 concurrent subscribers receive broadcasts: time to open, latency, KB each.
load *ARGS:
    python -m tests.prove.run load {{ARGS}}

# Fuzz: 20,000 seeded hostile cases against the port while a canary receives (`--seed N`).
fuzz *ARGS:
    python -m tests.prove.run fuzz {{ARGS}}

# longlived beside a grpc.aio and a plain grpclib peer (fanout, latency, idle, reconnect),
# one round at small sizes; results in benchmarks/results/quick/ (git-ignored). Needs the
# dev install (it includes matplotlib); redis-server on PATH adds reconnect's Redis row.
# Benchmarks, quick (under 3 minutes). See benchmarks/README.md.
bench *ARGS:
    python -m benchmarks.run --quick {{ARGS}}

# 3 rounds at the issue's sizes (10,000 streams held 60 s, 1,000 clients across a restart);
# results in benchmarks/results/, to commit with the figures in benchmarks/README.md.
# Benchmarks, full (about 45 minutes on 2 cores; run it on a quiet machine).
bench-full *ARGS:
    python -m benchmarks.run --full {{ARGS}}
