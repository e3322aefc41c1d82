"""The documentation site (``docs/``, built by ``just docs``) shows what the code is: every
Python snippet runs and type-checks, every public name has a reference entry and a
docstring (the reference hides members without one), and every setting is listed."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import griffe
import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

import longlived
from docs.hooks import env_var, settings_markdown
from longlived.settings import ENV_PREFIX, Settings
from tests.snippets import ROOT, run_snippet, type_check

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.M | re.S)
SNIPPETS = [
    (page.relative_to(DOCS).as_posix(), textwrap.dedent(found.group(2)))
    for page in PAGES
    for found in BLOCK.finditer(page.read_text())
    if "--8<--" not in found.group(2)  # a file included as it is (the examples, tested)
]
DIRECTIVE = re.compile(r"^::: ([\w.]+)$", re.M)


def test_the_docs_have_snippets() -> None:
    assert len(SNIPPETS) >= 5


@pytest.mark.parametrize(("page", "snippet"), SNIPPETS, ids=[p for p, _ in SNIPPETS])
def test_a_docs_snippet_runs(page: str, snippet: str, tmp_path: Path) -> None:
    ran = run_snippet(snippet, tmp_path)
    assert ran.returncode == 0, f"{page}:\n{ran.stderr}"


def test_every_docs_snippet_type_checks(tmp_path: Path) -> None:
    checked = type_check([snippet for _, snippet in SNIPPETS], tmp_path)
    assert checked.returncode == 0, checked.stdout


def test_every_public_name_is_in_the_reference() -> None:
    documented = {
        name.removeprefix("longlived.")
        for page in (DOCS / "reference").glob("*.md")
        for name in DIRECTIVE.findall(page.read_text())
    }
    assert set(longlived.__all__) - documented == set()


def _package() -> griffe.Module:
    package = griffe.load("longlived", search_paths=[str(ROOT)], docstring_parser="google")
    assert isinstance(package, griffe.Module)
    return package


def _attributes_section(cls: griffe.Object) -> set[str]:
    """The names an ``Attributes:`` section of ``cls``'s docstring describes."""
    if cls.docstring is None:
        return set()
    return {
        item.name
        for section in cls.docstring.parse("google")
        if section.kind is griffe.DocstringSectionKind.attributes
        for item in section.value
    }


def _undocumented() -> list[str]:
    """Public names, and the public members of public classes, the reference would show
    without a docstring (it leaves them out)."""
    package = _package()
    missing: list[str] = []
    for name in longlived.__all__:
        target = package[name].final_target
        if target.docstring is None:
            missing.append(name)
        if not target.is_class or target.path.startswith("longlived._proto."):
            continue  # generated messages: their docs are the proto's comments
        model = getattr(longlived, name)
        fields = model.model_fields if issubclass(model, BaseModel) else {}
        described = _attributes_section(target) | {
            field for field, info in fields.items() if info.description or _group(info)
        }  # pydantic fields: by their description, a group by its class (the Settings page)
        for member_name, member in target.members.items():
            if member_name.startswith("_") or member_name == "model_config":
                continue
            if member.docstring is None and member_name not in described:
                missing.append(f"{name}.{member_name}")
    return missing


def test_every_public_name_and_member_has_a_docstring() -> None:
    assert _undocumented() == []


def _group(field: FieldInfo) -> type[BaseModel] | None:
    kind = field.annotation
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _leaves(model: type[BaseModel], loc: list[str]) -> list[tuple[list[str], FieldInfo]]:
    """Every setting under ``model`` (at ``loc``), groups walked into."""
    found = []
    for name, field in model.model_fields.items():
        if (group := _group(field)) is not None:
            found += _leaves(group, [*loc, name])
        else:
            found.append(([*loc, name], field))
    return found


SETTINGS = _leaves(Settings, [])


def test_the_settings_page_lists_every_setting_with_its_meaning() -> None:
    page = settings_markdown()
    for loc, field in SETTINGS:
        assert f"`{env_var(loc)}`" in page
        assert field.description, f"{env_var(loc)} has no description"
        assert field.description.replace("|", "\\|") in page


def test_every_env_var_the_docs_and_readme_name_is_a_setting() -> None:
    known = {env_var(loc) for loc, _ in SETTINGS} | {
        ENV_PREFIX + name.upper() for name in Settings.model_fields
    }
    texts = [page.read_text() for page in PAGES] + [(ROOT / "README.md").read_text()]
    named = {name for text in texts for name in re.findall(r"\bLONGLIVED_[A-Z_]*[A-Z]", text)}
    assert named - known == set()
