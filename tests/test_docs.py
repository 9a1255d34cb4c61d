"""The README and docs/: the README stays short, every relative link resolves, every `python -m` module and
`python bench/...` script mentioned exists, and every launcher command shown in a ```bash block composes with conf/
(its Hydra overrides go through common.run.config.compose, which validates them as a launcher would)."""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.run.config import compose
from tests.conftest import ROOT

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [README, *PAGES]
MAX_README_LINES = 300

# Launchers whose arguments are Hydra overrides of conf/, and how many positional arguments (an output directory)
# come before the overrides.
HYDRA_MODULES = {"simulation": 0, "server": 0, "client": 0, "serving": 0, "simulation.export_shards": 1,
                 "serving.make_catalog": 1, "serving.compress": 0}
# Overrides that name a file or directory: where the docs show a placeholder ($VAR, <dir>) they get a dummy path.
# compose checks no file, only that a path is set where the config needs one.
PATH_KEYS = {"data.path", "data.test_path", "data.cache_dir", "model.path", "deploy.shard", "deploy.model_path",
             "serving.model_dir", "serving.catalog", "serving.compress.queries", "serving.compress.query_log"}
# A config group choice that needs a path: the path gets a dummy when the command gives none.
NEEDS_PATH = {"data=csv": "data.path", "data=esci": "data.path", "model=local": "model.path"}
DUMMY_PATH = "docs-dummy/shard.parquet"
SHELL_OPERATORS = {";", "&", "&&", "|", "||"}
PYTHON = re.compile(r"(^|/)python[0-9.]*$")


@dataclass(frozen=True)
class Command:
    """One `python -m <module> args...` shown in a ```bash block."""

    where: str  # file:line
    module: str
    args: tuple[str, ...]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def bash_lines(path: Path) -> list[tuple[int, str]]:
    """The logical lines of every ```bash block (backslash continuations joined), with their first line number."""
    out: list[tuple[int, str]] = []
    in_bash, pending, start = False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_bash = not in_bash and stripped[3:].strip() == "bash"
            pending = ""
            continue
        if not in_bash:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append((start, pending + stripped))
        pending = ""
    return out


def commands_in(path: Path) -> list[Command]:
    """Every `python -m <module> ...` of the file's bash blocks, its arguments cut at a comment or shell operator."""
    found = []
    for number, line in bash_lines(path):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i in range(len(tokens) - 2):
            if PYTHON.search(tokens[i]) and tokens[i + 1] == "-m":
                args = []
                for token in tokens[i + 3:]:
                    if token in SHELL_OPERATORS:
                        break
                    args.append(token)
                found.append(Command(f"{_rel(path)}:{number}", tokens[i + 2], tuple(args)))
    return found


COMMANDS = [c for path in DOCS for c in commands_in(path)]
HYDRA_COMMANDS = [c for c in COMMANDS if c.module in HYDRA_MODULES]


def overrides_of(cmd: Command) -> list[list[str]]:
    """The Hydra overrides of a launcher command: flags and their values, Hydra's own settings, the Optuna search
    (a sweeper plugin, not config) and placeholders left out; a sweep (-m) gives every combination of its values."""
    kept: list[str] = []
    multirun = False
    flag_value = False
    for arg in cmd.args[HYDRA_MODULES[cmd.module]:]:
        if flag_value and not arg.startswith("-") and "=" not in arg:
            flag_value = False
            continue  # the value of the --flag before it
        flag_value = False
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg.startswith("--"):
            flag_value = "=" not in arg
        elif arg.startswith(("hydra/", "hydra.", "+search=")):
            continue
        elif "$" in arg or re.search(r"<[^<>]*>", arg):
            key = arg.split("=", 1)[0]
            if "=" in arg and key in PATH_KEYS:
                kept.append(f"{key}={DUMMY_PATH}")
        else:
            kept.append(arg)
    for choice, key in NEEDS_PATH.items():
        if choice in kept and not any(o.startswith(f"{key}=") for o in kept):
            kept.append(f"{key}={DUMMY_PATH}")
    if not multirun:
        return [kept]
    options = []
    for override in kept:
        key, sep, value = override.partition("=")
        if sep and "," in value and not re.search(r"[\[\](){}'\"]", value):
            options.append([f"{key}={v}" for v in value.split(",")])
        else:
            options.append([override])
    return [list(combo) for combo in itertools.product(*options)]


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (where brackets are code, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _links(path: Path) -> list[str]:
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(path.read_text()))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _prose(path.read_text()), flags=re.M)
    seen: dict[str, int] = {}
    anchors = set()
    for heading in headings:
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_every_relative_link_points_to_an_existing_file(path):
    bad = []
    for link in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):
            continue  # https:, mailto:
        target, _, anchor = link.partition("#")
        resolved = (path.parent / target).resolve() if target else path
        if not resolved.exists():
            bad.append(f"{link}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            bad.append(f"{link}: no heading with that anchor in {_rel(resolved)}")
    assert not bad, f"{_rel(path)}: broken links: {bad}"


def test_the_readme_links_every_docs_page_and_each_page_links_back():
    readme_links = set(_links(README))
    assert PAGES, "docs/ has no pages"
    for page in PAGES:
        assert f"docs/{page.name}" in {link.partition("#")[0] for link in readme_links}, \
            f"README.md does not link docs/{page.name}"
        lines = [line for line in page.read_text().splitlines() if line.strip()]
        assert lines[0].startswith("# "), f"{_rel(page)}: starts with a title"
        assert "](../README.md)" in lines[1], f"{_rel(page)}: its one-line summary links back to the README"


def _module_exists(name: str) -> bool:
    parts = name.split(".")
    if (ROOT / parts[0]).is_dir():
        base = ROOT.joinpath(*parts)
        return (base / "__main__.py").is_file() or base.with_suffix(".py").is_file()
    return importlib.util.find_spec(name) is not None  # pytest, venv: not this repository's


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_every_module_and_bench_script_mentioned_exists(path):
    text = path.read_text()
    modules = set(re.findall(r"(?<![\w-])python[0-9.]*\s+-m\s+([A-Za-z_][\w.]*\w)", text))
    scripts = set(re.findall(r"(?<![\w-])python[0-9.]*\s+(bench/[\w./-]+\.py)", text))
    missing = sorted(m for m in modules if not _module_exists(m))
    missing += sorted(s for s in scripts if not (ROOT / s).is_file())
    assert not missing, f"{_rel(path)} mentions what does not exist: {missing}"


def test_the_docs_show_enough_launcher_commands_to_check():
    assert len(HYDRA_COMMANDS) >= 10, [c.where for c in HYDRA_COMMANDS]
    assert {c.module for c in HYDRA_COMMANDS} >= {"simulation", "server", "client", "serving"}


@pytest.mark.parametrize("cmd", HYDRA_COMMANDS, ids=lambda c: f"{c.where}:{c.module}")
def test_every_documented_launcher_command_composes(cmd):
    for overrides in overrides_of(cmd):
        try:
            compose(overrides)
        except Exception as exc:  # noqa: BLE001 - any failure is the doc's: name the command
            pytest.fail(f"{cmd.where}: python -m {cmd.module} {' '.join(cmd.args)}\n"
                        f"  overrides {overrides} do not compose: {exc}")
