"""A small Dockerfile parser for the deploy tests: the instructions deploy/Dockerfile uses
(FROM, ENV, RUN, USER, EXPOSE, HEALTHCHECK, CMD, STOPSIGNAL), line continuations, comments
(also inside continuations), parser directives, and Docker's environment replacement
($VAR, ${VAR}, ${VAR:-word}, ${VAR:+word}; none inside single quotes).

Loaded by path (tests/deploy is not a package on sys.path): see load() in the tests.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the logical line, continuations joined
    line: int  # where it starts (1-based)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self, base_env: dict[str, str] | None = None) -> dict[str, str]:
        """The ENV the stage leaves, values substituted as Docker does: each ENV instruction
        expands against the environment from before it (the base image's, here `base_env`)."""
        env = dict(base_env or {})
        for ins in self.all("ENV"):
            before = dict(env)
            for key, value in parse_env_args(ins.args, before):
                env[key] = value
        return env


class DockerfileError(ValueError):
    pass


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join `\\`-continued lines; drop comments, blank lines and parser directives."""
    out: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and current):
            continue  # comment lines (also inside a continuation) and empty continuation lines
        if not stripped:
            continue
        if not current:
            start = number
        if stripped.endswith("\\"):
            current.append(stripped[:-1].strip())
            continue
        current.append(stripped)
        out.append((start, " ".join(p for p in current if p)))
        current = []
    if current:
        raise DockerfileError(f"line {start}: continuation runs past the end of the file")
    return out


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for line, logical in _logical_lines(text):
        keyword, _, args = logical.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            if len(words) == 3 and words[1].lower() == "as":
                stages.append(Stage(words[0], words[2]))
            elif len(words) == 1:
                stages.append(Stage(words[0], None))
            else:
                raise DockerfileError(f"line {line}: cannot read FROM {args!r}")
            continue
        if not stages:
            if keyword != "ARG":
                raise DockerfileError(f"line {line}: {keyword} before the first FROM")
            continue
        stages[-1].instructions.append(Instruction(keyword, args, line))
    if not stages:
        raise DockerfileError("no FROM instruction")
    return stages


_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def substitute(value: str, env: dict[str, str]) -> str:
    """Docker's environment replacement: $VAR, ${VAR}, ${VAR:-word}, ${VAR:+word}."""

    def repl(m: re.Match) -> str:
        name = m.group("braced") or m.group("bare")
        current = env.get(name, "")
        if m.group("op") == "-":
            return current or m.group("word")
        if m.group("op") == "+":
            return m.group("word") if current else ""
        return current

    return _VAR.sub(repl, value)


def parse_env_args(args: str, env: dict[str, str]) -> list[tuple[str, str]]:
    """ENV KEY=VALUE [KEY=VALUE...] (quotes, backslash escapes, substitution outside single
    quotes) or the legacy ENV KEY VALUE."""
    first = args.split(None, 1)
    if not first:
        raise DockerfileError("empty ENV")
    if "=" not in first[0]:
        if len(first) != 2:
            raise DockerfileError(f"ENV {args!r}: expected KEY VALUE or KEY=VALUE")
        return [(first[0], substitute(first[1], env))]
    pairs: list[tuple[str, str]] = []
    word, quote, i = [], None, 0
    words: list[str] = []
    while i < len(args):
        c = args[i]
        if quote == "'":
            if c == "'":
                quote = None
            else:
                word.append(c)
        elif c == "\\" and i + 1 < len(args):
            word.append(args[i + 1])
            i += 1
        elif quote == '"':
            if c == '"':
                quote = None
            elif c == "$":
                m = _VAR.match(args, i)
                word.append(substitute(m.group(0), env) if m else c)
                i = m.end() - 1 if m else i
            else:
                word.append(c)
        elif c in "'\"":
            quote = c
        elif c == "$":
            m = _VAR.match(args, i)
            word.append(substitute(m.group(0), env) if m else c)
            i = m.end() - 1 if m else i
        elif c.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(c)
        i += 1
    if quote:
        raise DockerfileError(f"ENV {args!r}: unterminated quote")
    if word:
        words.append("".join(word))
    for w in words:
        key, eq, value = w.partition("=")
        if not eq or not key:
            raise DockerfileError(f"ENV {args!r}: {w!r} is not KEY=VALUE")
        pairs.append((key, value))
    return pairs


def parse_command(args: str) -> tuple[str, list[str]]:
    """CMD/ENTRYPOINT/HEALTHCHECK CMD arguments: ("exec", argv) for the JSON form, else
    ("shell", ["/bin/sh", "-c", args])."""
    if args.startswith("["):
        try:
            argv = json.loads(args)
        except json.JSONDecodeError as exc:
            raise DockerfileError(f"{args!r} starts like the exec form but is not a JSON array: {exc}") from None
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise DockerfileError(f"{args!r}: the exec form is a non-empty JSON array of strings")
        return "exec", argv
    return "shell", ["/bin/sh", "-c", args]


@dataclass
class Healthcheck:
    options: dict[str, str]
    form: str
    argv: list[str]


def parse_healthcheck(args: str) -> Healthcheck | None:
    """HEALTHCHECK [--opt=value...] CMD command | HEALTHCHECK NONE."""
    rest, options = args, {}
    while rest.startswith("--"):
        opt, _, rest = rest.partition(" ")
        name, eq, value = opt[2:].partition("=")
        if not eq:
            raise DockerfileError(f"HEALTHCHECK option {opt!r} needs a value (--name=value)")
        options[name] = value
        rest = rest.lstrip()
    keyword, _, command = rest.partition(" ")
    if keyword.upper() == "NONE":
        return None
    if keyword.upper() != "CMD":
        raise DockerfileError(f"HEALTHCHECK {args!r}: expected CMD or NONE")
    form, argv = parse_command(command.strip())
    return Healthcheck(options, form, argv)


def parse_expose(args: str, env: dict[str, str]) -> set[tuple[int, str]]:
    ports = set()
    for item in substitute(args, env).split():
        port, _, proto = item.partition("/")
        ports.add((int(port), (proto or "tcp").lower()))
    return ports


def parse_run(args: str) -> tuple[dict[str, str], list[list[str]]]:
    """RUN [--mount=... ...] shell command -> (flags, the commands joined by &&)."""
    flags: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        opt, _, rest = rest.partition(" ")
        name, _, value = opt[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    commands, current = [], []
    for token in shlex.split(rest):
        if token in ("&&", ";", "||"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return flags, commands
