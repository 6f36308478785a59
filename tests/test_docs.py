"""The documentation (README.md and docs/*.md) stays true to the repository: every relative link
and image resolves (anchors included), every quoted command parses, and no text narrates how the
work went (commit hashes, clock times, dates, work sessions).

Fast and TensorFlow-free: the commands are checked against ``metarl_tf.cli.build_parser()`` (an
argparse parser; building it imports no TensorFlow), the Makefile's targets, the bench scripts'
option strings and the service's routes, without running anything.
"""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.I)
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
BENTOML_ROUTES = {"/livez", "/readyz", "/metrics", "/docs.json", "/"}


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans."""
    return INLINE_CODE.sub("``", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def _anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(anchors)


def _links(path: Path) -> list[str]:
    prose = _prose(path.read_text())
    return LINK.findall(prose) + HTML_SRC.findall(prose)


def _link_problems(doc: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in _links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.is_relative_to(root):
            problems.append(f"{target}: points outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: {resolved.relative_to(root)} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"{target}: no heading with anchor #{anchor} in {resolved.name}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_relative_links_and_images_resolve(doc):
    problems = _link_problems(doc)
    assert not problems, f"{doc.name}:\n" + "\n".join(problems)


def test_the_link_check_catches_what_it_should(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# A guide\n\n## Serving (`/adapt`)\n")
    (tmp_path / "fig.png").write_bytes(b"")
    doc = tmp_path / "README.md"
    doc.write_text(
        "[ok](docs/guide.md#serving-adapt) ![ok](fig.png) [ok](#top-heading) [web](https://x.org)\n"
        "# Top heading\n"
        "[gone](docs/missing.md) ![gone](missing.png) [bad anchor](docs/guide.md#servingg)\n"
        "[out](../elsewhere.md) `[code](not/a/link.md)`\n"
        "```bash\n[in a block](no/link.md)\n```\n"
    )
    problems = _link_problems(doc, root=tmp_path)
    assert len(problems) == 4, problems
    for target in ("docs/missing.md", "missing.png", "#servingg", "../elsewhere.md"):
        assert any(target in p for p in problems), target


# -- commands -----------------------------------------------------------------------------------


def _shell_commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, ``NAME="..."`` variables
    expanded, split at ``&&``, ``||``, ``;``, ``|`` and cut at redirections; comments dropped."""
    variables: dict[str, str] = {}
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        for name, value in variables.items():
            line = line.replace(f"${name}", value).replace(f"${{{name}}}", value)
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: a multi-line JSON body (curl -d '{...}')
            tokens = shlex.split(line.split("'", 1)[0], comments=True)
        assignment = re.fullmatch(r"([A-Za-z_]\w*)=(.*)", tokens[0]) if len(tokens) == 1 else None
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
            continue
        current: list[str] = []
        for token in tokens:
            if token in ("&&", "||", ";", "|"):
                commands.append(current)
                current = []
            elif token.startswith(">") or token.startswith("2>"):
                current.append(">")  # everything after a redirection is a file name
            else:
                current.append(token)
        commands.append(current)
    cleaned = []
    for tokens in commands:
        tokens = tokens[: tokens.index(">")] if ">" in tokens else tokens
        while tokens and re.fullmatch(r"[A-Za-z_]\w*=\S*", tokens[0]):  # VAR=value command
            tokens = tokens[1:]
        if tokens:
            cleaned.append(tokens)
    return cleaned


def _quoted_commands(doc: Path) -> list[list[str]]:
    text = doc.read_text()
    commands = []
    for lang, body in FENCE.findall(text):
        if lang in SHELL_BLOCKS:
            commands += _shell_commands(body)
    for span in INLINE_CODE.findall(FENCE.sub("", text)):
        code = span.strip("`")
        if re.match(r"(python3? -m metarl_tf|make) ", code):
            commands += _shell_commands(code.replace("[", " ").replace("]", " "))
    return commands


@cache
def _cli_subparsers():
    from metarl_tf.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sub.choices


@cache
def _make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, flags=re.M))


@cache
def _service_routes() -> frozenset[str]:
    text = (ROOT / "serving" / "service.py").read_text()
    return frozenset(re.findall(r"""route=["'](/[^"']*)["']""", text)) | BENTOML_ROUTES


def _is_placeholder(token: str) -> bool:
    return token.startswith(("$", "<")) or token in ("...", "…")


def _check_cli(tokens: list[str]) -> list[str]:
    """``python -m metarl_tf SUB [args]``: the subcommand exists, its flags and choices too."""
    subparsers = _cli_subparsers()
    if len(tokens) < 4 or tokens[3] not in subparsers:
        sub = tokens[3] if len(tokens) > 3 else "(none)"
        return [f"unknown subcommand {sub!r}; known: {', '.join(sorted(subparsers))}"]
    options = subparsers[tokens[3]]._option_string_actions
    problems = []
    args = tokens[4:]
    for i, token in enumerate(args):
        if not token.startswith("-") or re.fullmatch(r"-\d.*", token):  # a value, e.g. -1.6
            continue
        flag, _, inline = token.partition("=")
        action = options.get(flag)
        if action is None:
            problems.append(f"{tokens[3]}: unknown option {flag}")
            continue
        value = inline or (args[i + 1] if i + 1 < len(args) else "")
        checkable = action.choices and action.nargs is None and not _is_placeholder(value)
        if checkable and value and value not in action.choices:
            problems.append(f"{tokens[3]} {flag}: {value!r} is not one of {action.choices}")
    return problems


def _check_command(tokens: list[str]) -> list[str]:
    program = tokens[0].rsplit("/", 1)[-1]
    if program in ("python", "python3", "python3.11") and len(tokens) > 2 and tokens[1] == "-m":
        module = tokens[2]
        if module == "metarl_tf":
            return _check_cli(tokens)
        if module.startswith(("metarl_tf.", "serving.")):
            path = ROOT / (module.replace(".", "/") + ".py")
            return [] if path.is_file() else [f"no module file {path.relative_to(ROOT)}"]
        return []  # other tools' modules (venv, pytest, ...)
    if program.startswith("python") and len(tokens) > 1 and tokens[1].endswith(".py"):
        script = ROOT / tokens[1]
        if not script.is_file():
            return [f"no script {tokens[1]}"]
        source = script.read_text()
        flags = {t.partition("=")[0] for t in tokens[2:] if re.match(r"--[a-z]", t)}
        return [f"{tokens[1]}: unknown option {f}" for f in sorted(flags) if f'"{f}"' not in source]
    if program == "make":
        targets = [t for t in tokens[1:] if not t.startswith("-") and "=" not in t]
        return [
            f"make: no target {t!r} in the Makefile" for t in targets if t not in _make_targets()
        ]
    if program == "curl":
        urls = [t for t in tokens if re.match(r"https?://", t)]
        paths = [re.sub(r"https?://[^/]+", "", u) or "/" for u in urls]
        return [f"curl: no route {p} in the service" for p in paths if p not in _service_routes()]
    return []


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_quoted_commands_parse(doc):
    problems = []
    for tokens in _quoted_commands(doc):
        problems += [f"`{' '.join(tokens)}`: {p}" for p in _check_command(tokens)]
    assert not problems, f"{doc.name}:\n" + "\n".join(problems)


def test_the_readme_quotes_the_two_commands_and_the_cli():
    commands = [" ".join(t) for t in _quoted_commands(ROOT / "README.md")]
    assert "make demo" in commands and "make test" in commands
    for sub in ("train", "evaluate"):
        assert any(c.startswith(f"python -m metarl_tf {sub} ") for c in commands), sub


def test_the_command_checks_catch_what_they_should():
    """The checks above are not vacuous: each kind of mistake is reported."""
    cases = {
        "python -m metarl_tf trian --preset nav2d": "unknown subcommand",
        "python -m metarl_tf train --presets nav2d": "unknown option --presets",
        "python -m metarl_tf train --preset nav3d": "is not one of",
        "python -m metarl_tf.envs.no_such_module x": "no module file",
        "python bench/train_speed.py --no-such-flag": "unknown option --no-such-flag",
        "make deploy": "no target 'deploy'",
        "curl -s -X POST http://127.0.0.1:3000/adaptt -d {}": "no route /adaptt",
    }
    for command, message in cases.items():
        (tokens,) = _shell_commands(command)
        assert any(message in p for p in _check_command(tokens)), command
    ok = 'NET="--preset nav2d --hidden-sizes 100,100"\npython -m metarl_tf train $NET --resume'
    (tokens,) = _shell_commands(ok)
    assert tokens[4:6] == ["--preset", "nav2d"] and not _check_command(tokens)


# -- narration ----------------------------------------------------------------------------------

NARRATION = {
    "commit hash": re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"),
    "clock time": re.compile(r"(?<![\d.:])\b(?:[01]?\d|2[0-3]):[0-5]\d\b(?![:.]?\d)"),
    "date": re.compile(r"\b\d{4}-\d{2}-\d{2}\b"),
    "work-session wording": re.compile(r"\bsessions?\b", re.I),
    "release history": re.compile(r"\bshipped (?:before|until|earlier)\b", re.I),
    "host state": re.compile(r"\b(?:slow|fast|quiet) (?:phase|hour)s?\b", re.I),
}


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_no_narration(doc):
    problems = []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for kind, pattern in NARRATION.items():
            for m in pattern.finditer(line):
                problems.append(f"line {number}: {kind} {m.group(0)!r}")
    assert not problems, f"{doc.name} narrates; state what is instead:\n" + "\n".join(problems)


def test_the_narration_check_catches_what_it_should():
    samples = {
        "commit hash": "measured at commit 8d72ff6",
        "clock time": "ran at 03:27",
        "date": "on 2026-12-01",
        "work-session wording": "in the fourth session",
        "release history": "the bundle shipped before",
        "host state": "during the host's slow phase",
    }
    for kind, text in samples.items():
        assert NARRATION[kind].search(text), kind
    for clean in ("http://127.0.0.1:3000/adapt", "weights 3,1", "seed 4241000", "1e-5", "[T, 2]"):
        assert not any(p.search(clean) for p in NARRATION.values()), clean
