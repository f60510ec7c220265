"""The documents agree with the code: docs/cli.md holds every command's `--help` verbatim, the README stays a
short front page whose links resolve, and the links between the documents point at files that exist.

    python tests/test_docs.py --update    # rewrite docs/cli.md's help blocks from the parser
"""
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"
BLOCK = re.compile(r"<!-- help:([\w-]+) -->\n```\n(.*?)```\n", re.S)


def help_text(command: str) -> str:
    """`perta-fast COMMAND --help` as printed on a 100-column terminal."""
    from perta_fast.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if a.dest == "command")
        return sub.choices[command].format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def commands() -> list[str]:
    from perta_fast.cli import COMMANDS_SPEC

    return list(COMMANDS_SPEC)


def test_cli_reference_holds_every_commands_help_verbatim():
    blocks = dict(BLOCK.findall(CLI_DOC.read_text()))
    assert sorted(blocks) == sorted(commands())
    for command in commands():
        assert blocks[command] == help_text(command), f"docs/cli.md: {command}'s help differs (python tests/test_docs.py --update)"


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12_500, f"README.md is {len(text.encode())} bytes; move reference text to docs/"
    for command in commands():
        assert f"`{command}`" in text or f"perta-fast {command}" in text, f"the README's table misses {command}"


@pytest.mark.parametrize("doc", ["README.md", "DEVELOPERS.md", *sorted(str(p.relative_to(ROOT))
                                                                       for p in (ROOT / "docs").glob("*.md")),
                                 "benchmarks/RESULTS.md", "benchmarks/HISTORY.md"])
def test_relative_links_resolve(doc):
    path = ROOT / doc
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{doc}: link to {target}, which does not exist"


def update() -> None:
    text = CLI_DOC.read_text()
    CLI_DOC.write_text(BLOCK.sub(lambda m: f"<!-- help:{m.group(1)} -->\n```\n{help_text(m.group(1))}```\n", text))


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        update()
    else:
        sys.exit("usage: python tests/test_docs.py --update")
