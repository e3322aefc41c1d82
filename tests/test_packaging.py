"""longlived as an app's developer installs and type-checks it: an editable install seen from
outside the repo, plain ``mypy --strict`` and strict pyright without the project's config
(no pydantic plugin), and what the wheel ships."""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``args`` in ``cwd``; its output, asserting it succeeded."""
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def app_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a fresh venv with longlived installed as ``pip install -e`` does,
    its dependencies taken from this venv (no index, no build isolation: no network)."""
    venv = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv)
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                       cwd=venv).strip())  # fmt: skip
    (purelib / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
        "--no-index", "--no-build-isolation", "--editable", ROOT, cwd=venv)  # fmt: skip
    return python


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """``examples/`` copied into an app directory outside the repo, with no config of ours."""
    shutil.copytree(ROOT / "examples", tmp_path / "app", ignore=shutil.ignore_patterns("__py*"))
    return tmp_path


def test_plain_mypy_strict_passes_on_an_app_outside_the_repo(app: Path, app_python: Path) -> None:
    # no pydantic plugin: Settings() must type-check through dataclass_transform alone. The
    # app's own config says only what any app says of betterproto2's generated code (it
    # calls one untyped function of betterproto2's): nothing of ours
    config = app / "mypy.ini"
    config.write_text("[mypy]\n[mypy-app.*._proto.*]\nignore_errors = True\n")
    out = run(sys.executable, "-m", "mypy", "--strict", "--config-file", config,
              "--no-incremental", "--python-executable", app_python, "app", cwd=app)  # fmt: skip
    assert "Success: no issues found" in out


def test_strict_pyright_passes_on_an_app_outside_the_repo(app: Path, app_python: Path) -> None:
    (app / "pyrightconfig.json").write_text('{"typeCheckingMode": "strict"}')
    # the warning about newer pyright releases would ask PyPI
    env = {**os.environ, "PYRIGHT_PYTHON_IGNORE_WARNINGS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", str(app_python), "app"],
        cwd=app, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    report = json.loads(result.stdout)
    problems = [
        f"{d['file']}:{d['range']['start']['line'] + 1}: {d['message']}"
        for d in report["generalDiagnostics"]
    ]
    assert problems == []
    assert report["summary"]["filesAnalyzed"] == len(list((app / "app").rglob("*.py")))


def test_the_wheel_ships_the_proto_and_the_license(tmp_path: Path) -> None:
    # built from a copy: setuptools builds in the source tree, and a stale build/ would hide
    # what a fresh checkout ships
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".*_cache", "__pycache__", "build", "dist", "*.egg-info"))  # fmt: skip
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
        "--no-build-isolation", "--wheel-dir", tmp_path / "dist", source, cwd=tmp_path)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("longlived-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        proto = archive.read("longlived/proto/longlived.proto")
        license = archive.read(next(n for n in names if n.endswith(".dist-info/licenses/LICENSE")))
    assert proto == (ROOT / "proto" / "longlived.proto").read_bytes()
    assert b"MIT License" in license
    assert {"longlived/py.typed", "longlived/_proto/py.typed"} <= names
    assert not any(name.startswith(("tests/", "examples/", "benchmarks/")) for name in names)


def test_the_proto_is_found_as_the_readme_says() -> None:
    proto = importlib.resources.files("longlived") / "proto" / "longlived.proto"
    assert proto.read_bytes() == (ROOT / "proto" / "longlived.proto").read_bytes()
