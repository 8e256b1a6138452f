"""The documentation (README.md and docs/*.md) against the code: every relative link resolves,
every `cxr <subcommand>` it names is one the parser has, the README stays short enough to read in
five minutes, and no issue number, work-log phrase ("stop 12") or commit id of this repository
slips in: the pages describe the project as it is, and git keeps its history.

No network, no TensorFlow: it reads Markdown files, builds the argparse parser and asks git.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250

# A fence opens with ``` or ~~~ (up to 3 spaces of indent) and closes with the same characters.
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# An inline code span: backticks, content, the same number of backticks; never across a blank line.
CODE_SPAN = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?\1", re.S)
# [text](target) and ![alt](target), with an optional "title"; [label]: target definitions.
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
LINK_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)  # http:, https:, mailto:, ...
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$")
# `cxr <subcommand>`, also after -v; not cxr-demo, cxr.fingerprint or CXR_FIXTURES.
CXR_COMMAND = re.compile(r"(?<![\w-])cxr(?:[ \t]+(?:-v|--verbose))?[ \t]+([a-z][a-z0-9_-]*)")

ISSUE_ANYWHERE = [
    re.compile(r"\bissues?[ \t]+#?\d+", re.I),
    re.compile(r"\bPRs?[ \t]+#?\d+\b"),
    re.compile(r"\bpull requests?[ \t]+#?\d+", re.I),
]
ISSUE_IN_PROSE = re.compile(r"(?<![\w&/])#\d+\b")  # "#13"; code (URLs, shell) is left out
DIARY = [
    re.compile(r"\bstops?[ \t]+\d+\b", re.I),
    re.compile(r"\b(?:this|last|previous|next|each|every)[ \t]+stop(?:'s)?\b", re.I),
]
# 7 to 40 hex digits standing alone: a commit id, abbreviated or whole, if git resolves it to one
# of this repository's commits (another repository's, such as a dataset's pinned version, does not)
HEX_TOKEN = re.compile(r"(?<!\w)[0-9A-Fa-f]{7,40}(?!\w)")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def prose(text: str) -> str:
    """The text with fenced blocks and inline code blanked out; line numbers are kept."""
    return CODE_SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), without_fences(text))


def without_fences(text: str) -> str:
    """The text with fenced blocks blanked out; line numbers are kept."""
    lines, fence = [], ""
    for line in text.splitlines():
        opened = FENCE.match(line)
        if fence:
            if (
                opened
                and opened.group(1)[0] == fence[0]
                and len(opened.group(1)) >= len(fence)
                and not line.strip()[len(opened.group(1)) :].strip()
            ):
                fence = ""
            lines.append("")
        elif opened:
            fence = opened.group(1)
            lines.append("")
        else:
            lines.append(line)
    return "\n".join(lines)


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def slug(heading: str) -> str:
    """The anchor a code host gives a heading: lowercase, punctuation dropped, spaces as '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    # `code` is kept: a heading's code span names its anchor too
    for line in without_fences(path.read_text(encoding="utf-8")).splitlines():
        if (m := HEADING.match(line)) is None:
            continue
        base = slug(m.group(2))
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    text = prose(path.read_text(encoding="utf-8"))
    found = [(line_of(text, m.start()), m.group(1)) for m in INLINE_LINK.finditer(text)]
    found += [(line_of(text, m.start()), m.group(1)) for m in LINK_DEFINITION.finditer(text)]
    return found


def link_problems(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with each relative link of a page in `root`, one line each."""

    def name(p: Path) -> str:
        return p.relative_to(root).as_posix()

    problems = []
    for line, target in links(path):
        where = f"{name(path)}:{line}: link ({target})"
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        if not file_part:  # a pure #anchor: a heading of this page
            if anchor and anchor not in anchors(path):
                problems.append(f"{where}: no heading of {name(path)} has the anchor #{anchor}")
            continue
        if file_part.startswith("/"):
            problems.append(f"{where}: an absolute path; a code host resolves only relative links")
            continue
        resolved = (path.parent / unquote(file_part)).resolve()
        if not resolved.is_relative_to(root):
            problems.append(f"{where}: points outside the repository")
        elif not resolved.exists():
            problems.append(f"{where}: {name(resolved)} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading of {name(resolved)} has the anchor #{anchor}")
    return problems


def parser_subcommands() -> set[str]:
    from orchestrator.cli import build_parser

    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subparsers) == 1, (
        f"expected one set of subcommands in build_parser(), found {len(subparsers)}"
    )
    return set(subparsers[0].choices)


def named_commands(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")  # code blocks and code spans included
    return [(line_of(text, m.start()), m.group(1)) for m in CXR_COMMAND.finditer(text)]


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def in_git_checkout() -> bool:
    """Whether ROOT is the top of a git checkout that git will read (not a copy, not a folder
    inside another repository)."""
    try:
        top = git("rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):
        return False
    return top.returncode == 0 and Path(top.stdout.strip()).resolve() == ROOT


def commit_ids(text: str) -> list[tuple[int, str]]:
    """(line, token) for each token of `text` that git resolves to a commit of this repository."""
    found, known = [], {}
    for m in HEX_TOKEN.finditer(text):
        token = m.group(0)
        if token not in known:
            known[token] = (
                git("rev-parse", "--verify", "--quiet", f"{token}^{{commit}}").returncode == 0
            )
        if known[token]:
            found.append((line_of(text, m.start()), token))
    return found


def test_the_documentation_pages_exist():
    assert README.is_file(), "README.md is missing"
    names = {p.name for p in DOCS.glob("*.md")}
    expected = {
        "data.md",
        "protocols.md",
        "training.md",
        "cluster.md",
        "tracking.md",
        "serving.md",
        "soundness.md",
        "performance.md",
        "development.md",
    }
    assert expected <= names, f"docs/ lacks {sorted(expected - names)}"


@pytest.mark.parametrize("path", pages(), ids=page_id)
def test_relative_links_resolve(path):
    problems = link_problems(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", pages(), ids=page_id)
def test_named_cxr_commands_exist(path):
    known = parser_subcommands()
    unknown = [
        f"{page_id(path)}:{line}: `cxr {name}` is not a subcommand of "
        "orchestrator.cli.build_parser()"
        for line, name in named_commands(path)
        if name not in known
    ]
    assert not unknown, (
        "\n".join(unknown) + f"\n(the parser's subcommands: {', '.join(sorted(known))})"
    )


def test_the_readme_names_every_subcommand():
    named = {name for _, name in named_commands(README)}
    missing = sorted(parser_subcommands() - named)
    assert not missing, (
        f"README.md: the command table lacks {', '.join('cxr ' + m for m in missing)}"
    )


def test_the_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, (
        f"README.md has {n} lines, more than {MAX_README_LINES}: move the detail into docs/"
    )


@pytest.mark.parametrize("path", pages(), ids=page_id)
def test_no_issue_numbers_or_diary(path):
    text = path.read_text(encoding="utf-8")
    text_prose = prose(text)
    problems = []
    for pattern in [*ISSUE_ANYWHERE, *DIARY]:
        problems += [
            f"{page_id(path)}:{line_of(text, m.start())}: {m.group(0)!r}"
            for m in pattern.finditer(text)
        ]
    problems += [
        f"{page_id(path)}:{line_of(text_prose, m.start())}: {m.group(0)!r} (an issue number)"
        for m in ISSUE_IN_PROSE.finditer(text_prose)
    ]
    assert not problems, (
        "issue numbers or work-log phrases; say what the software does instead:\n"
        + "\n".join(problems)
    )


def test_the_checks_catch_what_they_should(tmp_path):
    """The checks themselves, on a page of their own: a broken link, a missing anchor, a link out
    of the repository, an unknown command, an issue number; code is not taken for links."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n", encoding="utf-8")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Title\n\n[ok](#title) [gone](missing.md) [anchor](#nowhere) [web](https://example.org)\n"
        "[there](other.md#other-page) [not there](other.md#nope) [out](../../x.md) [up](../docs)\n"
        "`[code](not-a-link.md)`\n\n```\n[fenced](not-a-link-either.md)\n# not a heading\n```\n"
        "See issue 13 and #14; `#15` is code. cxr frobnicate, cxr-demo, cxr.tag, stop 3\n",
        encoding="utf-8",
    )
    assert link_problems(page, tmp_path) == [
        "docs/page.md:3: link (missing.md): docs/missing.md does not exist",
        "docs/page.md:3: link (#nowhere): no heading of docs/page.md has the anchor #nowhere",
        "docs/page.md:4: link (other.md#nope): no heading of docs/other.md has the anchor #nope",
        "docs/page.md:4: link (../../x.md): points outside the repository",
    ]
    assert [name for _, name in named_commands(page)] == ["frobnicate"]
    text = page.read_text(encoding="utf-8")
    assert ISSUE_ANYWHERE[0].findall(text) == ["issue 13"]
    assert ISSUE_IN_PROSE.findall(prose(text)) == ["#14"]
    assert DIARY[0].findall(text) == ["stop 3"]
    assert slug("The manifest: `cxr manifest`") == "the-manifest-cxr-manifest"
    assert (
        slug("covid-chestxray-dataset, at the paper's version")
        == "covid-chestxray-dataset-at-the-papers-version"
    )


@pytest.mark.parametrize("path", [*pages(), ROOT / "clusters" / "README.md"], ids=page_id)
def test_no_commit_ids_of_this_repository(path):
    """A page says what the project is; "at commit abc1234" is history, which git keeps."""
    if not in_git_checkout():
        pytest.skip(f"{ROOT} is not a git checkout: no commits to look for")
    found = commit_ids(path.read_text(encoding="utf-8"))
    assert not found, (
        "commit ids of this repository; describe the project as it is now, and "
        "leave its history to git:\n"
        + "\n".join(f"{page_id(path)}:{line}: {token}" for line, token in found)
    )


def test_the_commit_id_check_finds_one():
    """The check on a page of its own: this repository's commits, short and whole, are found;
    another repository's commit, a SHA-256 and hex digits inside a word are not."""
    if not in_git_checkout():
        pytest.skip(f"{ROOT} is not a git checkout: no commits to look for")
    whole = git("rev-parse", "HEAD").stdout.strip()
    short = git("rev-parse", "--short=7", "HEAD").stdout.strip()
    text = (
        f"# Page\n\nMeasured at {short}, then at `{whole}`.\n"
        "The dataset's commit 626cdf2e06f605008acb89fb27317e2aeb5740e6 stays.\n"
        f"SHA-256 {'ab' * 32}; x{short}y and {short}_tag are not ids.\n"
    )
    assert commit_ids(text) == [(3, short), (3, whole)]
