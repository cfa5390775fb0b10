"""The documentation: the site builds strictly, every command in it (and in the README) is one that exists, and
the Python examples run against a real server."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from tasktrail.cli import parser
from tasktrail.http.app import create_app
from tests.conftest import ROOT

PAGES = sorted((ROOT / "docs").rglob("*.md"))
DOCUMENTS = [ROOT / "README.md", *PAGES]
SHELL = {"sh", "bash", "shell", "console"}
QUIET = {"NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=os.environ | QUIET,
    )


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    done = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "clients" / "index.html").exists()


def test_a_broken_link_or_anchor_fails_the_build(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "index.md").open("a") as page:
        page.write("\n[gone](nowhere.md) and [gone too](api.md#no-such-heading)\n")
    done = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "nowhere.md" in done.stderr
    assert "no-such-heading" in done.stderr


def test_the_nav_lists_every_page_and_only_pages_that_exist() -> None:
    nav = re.findall(r"^\s+- [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert sorted(nav) == sorted(str(p.relative_to(ROOT / "docs")) for p in PAGES)


def test_the_readme_is_the_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for command in ("uv run tasktrail serve", "uv run pytest"):
        assert command in readme
    for page in PAGES:
        if page.name != "index.md":
            assert f"](docs/{page.relative_to(ROOT / 'docs')})" in readme, f"the README does not link {page.name}"


# -- every command in the docs


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    text: str
    words: list[str]


def blocks(path: Path, languages: set[str]) -> Iterator[tuple[int, str]]:
    """(line number, text) of each fenced code block in one of `languages`."""
    lines = path.read_text().splitlines()
    inside, start, body = None, 0, []
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^\s*```(\S*)", line)
        if fence and inside is None:
            inside, start, body = fence[1].lower(), number + 1, []
        elif fence:
            if inside in languages:
                yield start, "\n".join(body)
            inside = None
        elif inside is not None:
            body.append(line)


def commands(path: Path) -> Iterator[Command]:
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    for start, text in blocks(path, SHELL):
        logical, first = "", start
        for number, line in enumerate(text.splitlines(), start):
            if not logical:
                first = number
            logical += line
            if logical.endswith("\\"):
                logical = logical[:-1] + " "
                continue
            lexer = shlex.shlex(logical, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            try:
                lexed = list(lexer)
            except ValueError:  # a quote still open: the command goes on on the next line
                logical += "\n"
                continue
            words: list[str] = []
            for word in [*lexed, "&&"]:
                if word in {"&&", "||", ";", "|", "&"}:
                    # Leading NAME=value words set the environment; a line of only those runs nothing.
                    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
                        words.pop(0)
                    if words:
                        yield Command(f"{name}:{first}", logical.strip(), words)
                    words = []
                else:
                    words.append(word)
            logical = ""


def options(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("-") and w != "-"]


@cache
def help_text(*command: str) -> str:
    done = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT, env=os.environ | QUIET
    )
    return done.stdout + done.stderr if done.returncode == 0 else ""


def check_help(command: tuple[str, ...], words: list[str]) -> str | None:
    """The tool's --help must answer, and name every option the command uses."""
    text = help_text(*command)
    if not text:
        return f"`{' '.join(command)} --help` fails: no such command"
    missing = [o for o in options(words) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]
    return f"{' '.join(command)} has no option {', '.join(missing)}" if missing else None


def check_tasktrail(args: list[str]) -> str | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser().parse_args(args)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return f"tasktrail refuses it: {err.getvalue().strip().splitlines()[-1]}"
    return None


def check_path(word: str) -> str | None:
    path = word.split("::", 1)[0]
    return None if (ROOT / path).exists() else f"{path} does not exist"


def check_uv_run(words: list[str]) -> str | None:
    tool, args = words[0], words[1:]
    if tool == "tasktrail":
        return check_tasktrail(args)
    if tool == "pytest":
        return next(filter(None, (check_path(a) for a in args if not a.startswith("-"))), None)
    if tool == "python":
        if not args or (problem := check_path(args[0])):
            return problem or "python with no script"
        return check_help((sys.executable, args[0]), args[1:])
    if tool in ("mkdocs", "ruff"):
        sub = args[0] if args and not args[0].startswith("-") else None
        base = (sys.executable, "-m", tool, *([sub] if sub else []))
        return check_help(base, args[1:] if sub else args)
    return f"`uv run {tool}`: not a command this project has"


@cache
def routes() -> dict[str, dict]:
    """OpenAPI operations by path, from the app itself."""
    schema = create_app("postgresql://unused@127.0.0.1/none").openapi_schema.to_schema()
    return {path.rstrip("/") or "/": operations for path, operations in schema["paths"].items()}


def check_curl(words: list[str]) -> str | None:
    method, url, data = None, None, False
    it = iter(words[1:])
    for word in it:
        if word in ("-X", "--request"):
            method = next(it)
        elif word in ("-H", "--header", "-o", "--output", "-u", "--user"):
            next(it)
        elif word in ("-d", "--data", "--data-raw", "--data-binary"):
            next(it)
            data = True
        elif word.startswith("http"):
            url = word
    if url is None:
        return "curl with no URL"
    method = (method or ("POST" if data else "GET")).lower()
    parts = urlsplit(url.replace("$TASK_ID", "0b6f4f4e-6a2e-4c1e-9a51-3f1f3c1d2e3f"))
    path = parts.path.rstrip("/") or "/"
    matching = {
        template: operations
        for template, operations in routes().items()
        if re.fullmatch(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)), path)
    }
    if not matching:
        return f"no route {parts.path}"
    # A literal route (/tasks/cleanup) wins over a template that also matches (/tasks/{task_id}).
    answering = [t for t in sorted(matching, key=lambda t: t.count("{")) if method in matching[t]]
    if not answering:
        return f"{' or '.join(matching)} does not answer {method.upper()}"
    template, operations = answering[0], matching[answering[0]]
    parameters = {p["name"]: p for p in operations[method].get("parameters", []) if p["in"] == "query"}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in parameters:
            return f"{method.upper()} {template} has no query parameter {name!r}"
        schema = parameters[name].get("schema", {})
        patterns = [s.get("pattern") for s in [schema, *schema.get("oneOf", []), *schema.get("anyOf", [])]]
        patterns = [p for p in patterns if p]
        if value and not value.startswith("$") and patterns and not any(re.search(p, value) for p in patterns):
            return f"{name}={value} is not a valid {name} ({patterns[0]})"
    return None


def check(command: Command) -> str | None:
    words = command.words
    match words:
        case ["uv", "run", *rest] if rest:
            return check_uv_run(rest)
        case ["uv", sub, *rest]:
            return check_help(("uv", sub), rest)
        case ["tasktrail", *rest]:
            return check_tasktrail(rest)
        case ["curl", *_]:
            return check_curl(words)
        case ["cd", target]:
            return check_path(target)
        case ["pip", "install", target] | ["npm", "install", target]:
            return check_path(target)  # pip: .ci/run installs it so; npm: the folder test_js_package drives
        case ["npm", "pack", "--dry-run"]:
            return None  # tests/test_clients/test_js_package.py runs it
        case ["node", script, *_]:
            return check_path(script)
        case [program, *rest] if shutil.which(program):
            # Another tool (psql, pg_basebackup ...): it is installed, and its --help names the options used.
            return check_help((program,), rest)
    return f"{words[0]} is not a command of this project, nor installed here"


def all_commands() -> list[Command]:
    return [command for document in DOCUMENTS for command in commands(document)]


def test_the_docs_have_commands_to_check() -> None:
    found = {" ".join(c.words[:3]) for c in all_commands()}
    assert {"uv run tasktrail", "uv run pytest", "curl -X POST"} <= found


def test_every_command_in_the_docs_exists() -> None:
    found = all_commands()
    routes()  # built once, before the threads
    # Most checks wait on a subprocess's --help, side by side; tasktrail's own parser prints to this
    # process's stdout and stderr, so those run one at a time, here.
    ours = [c.words[:3] == ["uv", "run", "tasktrail"] or c.words[0] == "tasktrail" for c in found]
    with ThreadPoolExecutor(4) as pool:
        waiting = [None if mine else pool.submit(check, c) for c, mine in zip(found, ours, strict=True)]
        problems = [check(c) if w is None else w.result() for c, w in zip(found, waiting, strict=True)]
    failures = [f"{c.where}: {c.text}\n    {problem}" for c, problem in zip(found, problems, strict=True) if problem]
    assert not failures, "commands in the docs that do not exist:\n" + "\n".join(failures)


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ("uv run tasktrail serve --no-such-flag", "tasktrail refuses it"),
        ("uv run tasktrail keys add x --scope root", "tasktrail refuses it"),
        ("uv run pytest tests/test_nothing", "does not exist"),
        ("uv run python bench/nothing.py", "does not exist"),
        ("uv run python bench/run.py --fastest", "has no option --fastest"),
        ("curl http://localhost:8000/nowhere", "no route"),
        ("curl -X PUT http://localhost:8000/tasks/$TASK_ID", "does not answer PUT"),
        ("curl 'http://localhost:8000/events?after=ZXY6NzUzOjQy'", "not a valid after"),
        ("curl 'http://localhost:8000/tasks/?colour=red'", "no query parameter 'colour'"),
        ("tasktrailctl start", "not a command of this project, nor installed here"),
        ("ls --no-such-option", "has no option --no-such-option"),
    ],
)
def test_the_check_names_a_command_that_does_not_exist(tmp_path: Path, command: str, problem: str) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"```sh\n{command}\n```\n")
    (found,) = commands(page)
    assert problem in (check(found) or "")


# -- the Python examples run


@pytest.mark.parametrize("page", ["docs/clients.md", "docs/getting-started.md", "README.md"])
def test_the_python_examples_run_against_a_real_server(page: str, shared_server: str) -> None:
    """A page's Python blocks, in order, as one script, against a real server."""
    script = "\n\n".join(text for _, text in blocks(ROOT / page, {"python"}))
    assert script
    script = script.replace("http://127.0.0.1:8000", shared_server)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_the_javascript_examples_of_the_clients_page_run_against_a_real_server(shared_server: str) -> None:
    """Its JavaScript blocks, in order, as one module, with the package imported from the checkout."""
    script = "\n\n".join(text for _, text in blocks(ROOT / "docs/clients.md", {"js"}))
    assert "from 'tasktrail-client'" in script
    script = script.replace("from 'tasktrail-client'", f"from '{(ROOT / 'clients/js/tasktrail.mjs').as_uri()}'")
    script = script.replace("http://localhost:8000", shared_server)
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "completed 100" in done.stdout  # the watch saw the task finish
