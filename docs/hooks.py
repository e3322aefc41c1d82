"""MkDocs hooks: the pages that are generated from the code, so they cannot drift from it.

``<!-- settings -->`` in a page becomes one table per group of ``Settings`` (env var, flag,
default, allowed values, meaning, the commands that read it), from the pydantic model and
the ``longlived`` command's parsers; ``<!-- settings GROUP -->`` the table of one group;
``<!-- cli-help -->`` each command's ``--help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from longlived.cli import _COMMANDS, _parser
from longlived.settings import ENV_PREFIX, Settings, _names

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files
    from mkdocs.structure.pages import Page

SETTINGS = re.compile(r"<!-- settings(?: (\w+))? -->")
"""Where a page shows the settings (all, or one group's)."""

HELP_COLUMNS = 88
"""Width of the ``--help`` output shown (argparse wraps to the terminal's)."""


def on_page_markdown(markdown: str, /, *, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Fill in the generated parts of a page."""
    markdown = SETTINGS.sub(lambda found: settings_markdown(found.group(1)), markdown)
    if "<!-- cli-help -->" in markdown:
        markdown = markdown.replace("<!-- cli-help -->", cli_markdown())
    return markdown


# ----------------------------------------------------------------------------- settings


def settings_markdown(only: str | None = None) -> str:
    """Every setting, one table per group: the top-level settings first, then each group;
    or, with ``only``, the table of that group."""
    readers = _readers()
    groups: list[tuple[str, type[BaseModel]]] = []
    rows: list[str] = []
    for name, field in Settings.model_fields.items():
        group = _group(field)
        if group is None:
            rows.append(_row([name], field, readers))
        else:
            groups.append((name, group))
    if only is not None:
        group = dict(groups)[only]
        return "\n".join(_group_table(only, group, readers)) + "\n"
    parts = ["### General", "", *_table(rows)]
    for name, group in groups:
        doc = (group.__doc__ or "").strip()
        env = ENV_PREFIX + name.upper()
        parts += ["", f"### {name}", "", f"{doc} The whole group is also `{env}` (JSON).", ""]
        parts += _group_table(name, group, readers)
    return "\n".join(parts) + "\n"


def _group_table(name: str, group: type[BaseModel], readers: dict[str, list[str]]) -> list[str]:
    return _table([_row([name, sub], field, readers) for sub, field in group.model_fields.items()])


def env_var(loc: list[str]) -> str:
    """The env var of the setting at ``loc`` (``["backoff", "max"]``)."""
    return _names(loc)[0]


def flag(loc: list[str]) -> str:
    """The command-line flag of the setting at ``loc``."""
    return _names(loc)[1]


def _group(field: FieldInfo) -> type[BaseModel] | None:
    kind = field.annotation
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _table(rows: list[str]) -> list[str]:
    return [
        "| env var / flag | default | allowed | meaning | read by |",
        "|---|---|---|---|---|",
        *rows,
    ]


def _row(loc: list[str], field: FieldInfo, readers: dict[str, list[str]]) -> str:
    meaning = (field.description or "").replace("|", "\\|")
    commands = ", ".join(f"`{c}`" for c in readers.get(".".join(loc), [])) or "—"
    cells = [
        f"`{env_var(loc)}`<br>`{flag(loc)}`",
        _default(field),
        _allowed(field),
        meaning,
        commands,
    ]
    return "| " + " | ".join(cells) + " |"


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value, default=str)}`"


_KINDS: dict[object, str] = {
    bool: "true / false",
    int: "integer",
    float: "number",
    str: "text",
    Path: "file path",
    list: "JSON list",
    dict: "JSON object",
}
"""How the settings table names a type."""


def _allowed(field: FieldInfo) -> str:
    """The values a setting accepts, from its type and its bounds."""
    kind = field.annotation
    optional = False
    if get_origin(kind) in (Union, UnionType):
        kinds = [k for k in get_args(kind) if k is not type(None)]
        optional, kind = len(kinds) < len(get_args(kind)), kinds[0]
    if get_origin(kind) is Literal:
        text = ", ".join(f"`{choice}`" for choice in get_args(kind))
    else:
        text = _KINDS.get(get_origin(kind) or kind, str(kind))
        if bounds := [bound for item in field.metadata if (bound := _bound(item))]:
            text += ": " + " and ".join(bounds)
    return text + (", or `null`" if optional else "")


def _bound(item: object) -> str:
    for kind, attribute, sign in (
        (annotated_types.Gt, "gt", ">"),
        (annotated_types.Ge, "ge", "≥"),
        (annotated_types.Lt, "lt", "<"),
        (annotated_types.Le, "le", "≤"),
        (annotated_types.MinLen, "min_length", "length ≥"),
        (annotated_types.MaxLen, "max_length", "length ≤"),
    ):
        if isinstance(item, kind):
            value = getattr(item, attribute)
            return f"{sign} {value:,}" if isinstance(value, int) else f"{sign} {value}"
    return ""


def _readers() -> dict[str, list[str]]:
    """For each setting (``backoff.max``), the commands whose ``--help`` lists it."""
    found: dict[str, list[str]] = {}
    settings = _setting_dests()
    for command, parser in _commands().items():
        for action in parser._actions:
            if action.help != argparse.SUPPRESS and action.dest in settings:
                found.setdefault(action.dest, []).append(command)
    return found


def _setting_dests() -> set[str]:
    dests: set[str] = set()
    for name, field in Settings.model_fields.items():
        group = _group(field)
        dests.update([name] if group is None else (f"{name}.{sub}" for sub in group.model_fields))
    return dests


# ---------------------------------------------------------------------------------- CLI


def cli_markdown() -> str:
    """``longlived --help``, then each command's, folded."""
    with _columns(HELP_COLUMNS):
        parser, _ = _parser()
        parts = ["```text", f"$ longlived --help\n{parser.format_help()}```", ""]
        for command, sub in _commands().items():
            parts += [
                f'??? example "`longlived {command} --help`: {_COMMANDS[command]}"',
                "",
                "    ```text",
                *(f"    {line}".rstrip() for line in sub.format_help().splitlines()),
                "    ```",
                "",
            ]
    return "\n".join(parts)


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser, _ = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise RuntimeError("the longlived parser has no commands")


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    """argparse wraps help to ``$COLUMNS``: the same width on every machine."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before
