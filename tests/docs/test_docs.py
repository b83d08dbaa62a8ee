"""The documentation stays navigable and true to the repository.

- README.md is a guide, not a lab notebook: at most 16,000 bytes.
- Every relative Markdown link in every Markdown file of the repository resolves to a file or
  folder of the repository, and every `#anchor` to a heading of the linked document.
- No tracked file (code, tests, docs, deploy files) cites a document that is not in the
  repository (an upper-case Markdown name or a docs/ path that is not there, or a path into a
  shared folder outside the checkout), and every citation of a section by name
  (`docs/design.md, "Lifecycle"`) names a heading that exists.
- docs/design.md has the sections the code and the tests cite; docs/operating.md lists every
  flag of `mnist-edge serve`, and nothing else as one.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from functools import cache, lru_cache
from pathlib import Path
from urllib.parse import unquote

from mnist_edge.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README_LIMIT = 16_000

# Sections of docs/design.md that code, tests and pyproject.toml cite by name.
DESIGN_SECTIONS_CITED = (
    "Configuration",
    "Lifecycle",
    "Processes and speed",
    "Where performance is measured",
    "gRPC APIs",
    "Errors",
    "Private internals",
)

_SKIP_DIRS = {"build", "dist", "wheelhouse", "reports", "runs", "node_modules"}


@lru_cache(maxsize=1)
def repo_files() -> tuple[str, ...]:
    """Files of the repository as POSIX paths relative to ROOT: git's tracked files plus new,
    not ignored ones (so a document counts before its first commit); a walk without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, check=True, timeout=60,
        ).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = [
            p.relative_to(ROOT).as_posix()
            for p in ROOT.rglob("*")
            if p.is_file() and not any(part.startswith(".") or part in _SKIP_DIRS for part in p.relative_to(ROOT).parts)
        ]
    return tuple(sorted(n for n in names if (ROOT / n).is_file()))


@lru_cache(maxsize=1)
def repo_dirs() -> frozenset[str]:
    dirs = {""}
    for name in repo_files():
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return frozenset(dirs)


def markdown_files() -> list[str]:
    return [n for n in repo_files() if n.endswith(".md")]


def exists(rel: str) -> bool:
    return rel in repo_files() or rel.rstrip("/") in repo_dirs()


def resolve(base_dir: str, target: str) -> str | None:
    """`target` relative to `base_dir` (or to ROOT when it starts with /), as a path relative to
    ROOT; None when it leaves the repository."""
    start = ROOT if target.startswith("/") else ROOT / base_dir
    path = (start / target.lstrip("/")).resolve()
    try:
        return path.relative_to(ROOT.resolve()).as_posix()
    except ValueError:
        return None


# -- Markdown --------------------------------------------------------------------------------
_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m:
            if fenced is None:
                fenced = m.group(1)
            elif m.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            out.append((number, line))
    return out


def links(text: str) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(text):
        line = _INLINE_CODE.sub("", line)
        found += [(number, m.group(1)) for m in _LINK.finditer(line)]
        m = _REF_DEF.match(line)
        if m:
            found.append((number, m.group(1)))
    return found


def heading_texts(text: str) -> list[str]:
    """Headings as a reader sees them: inline code marks and link syntax removed."""
    out = []
    for _, line in prose_lines(text):
        m = _HEADING.match(line)
        if m:
            title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(2))
            out.append(title.replace("`", "").strip())
    return out


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


@cache
def anchors(rel: str) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    for title in heading_texts((ROOT / rel).read_text(encoding="utf-8")):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return frozenset(result)


def test_slug_matches_github():
    assert slug("Where performance is measured") == "where-performance-is-measured"
    assert slug("gRPC APIs") == "grpc-apis"
    assert slug("models/ and the manifest") == "models-and-the-manifest"
    assert slug("TLS, mutual TLS and tokens") == "tls-mutual-tls-and-tokens"


def test_readme_is_a_guide_not_a_notebook():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size:,} bytes, over the {README_LIMIT:,} a guide may take: move reference material to docs/"


def test_every_relative_markdown_link_resolves():
    assert "README.md" in markdown_files() and "docs/design.md" in markdown_files()
    broken = []
    for md in markdown_files():
        base = str(Path(md).parent) if "/" in md else ""
        for number, target in links((ROOT / md).read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, ...
                continue
            path, _, anchor = unquote(target).partition("#")
            rel = md if not path else resolve(base, path)
            where = f"{md}:{number}: ({target})"
            if rel is None:
                broken.append(f"{where} points outside the repository")
                continue
            if not exists(rel):
                broken.append(f"{where}: no {rel} in the repository")
                continue
            if anchor and rel.endswith(".md") and anchor not in anchors(rel):
                broken.append(f"{where}: {rel} has no heading with the anchor #{anchor} (it has: {', '.join(sorted(anchors(rel)))})")
    assert not broken, "broken Markdown links:\n" + "\n".join(broken)


# -- citations in every file --------------------------------------------------------------------
_BINARY_SUFFIXES = {".onnx", ".ort", ".png", ".jpg", ".jpeg", ".gz", ".whl", ".pt", ".sig", ".ico"}
# A document named in text: an upper-case Markdown name (README.md, CHANGELOG.md, ...) or
# any Markdown path under docs/, with the folders before it.
_DOC_CITE = re.compile(r"(?<![\w/.-])((?:\.\.?/)*(?:[\w.-]+/)*(?:[A-Z][A-Z0-9_-]*\.md|docs/[\w./-]+?\.md))(?![\w-])")
_OUTSIDE = re.compile(r"(?<![\w.])\.\./(?:\.\./)*shared\b")
# A section cited by name: `docs/design.md, "Lifecycle"`, `design.md "Errors"`, `(README "Speed")`.
_SECTION_CITE = re.compile(r"((?:[\w.-]+/)*[\w-]+\.md|README)[,:]?\s*\(?\s*\"([A-Za-z][^\"]{1,80})\"")
_COMMENT_MARK = re.compile(r"^\s*(?:#|//|\*|--|;)\s?", re.MULTILINE)


def text_files() -> list[str]:
    this = Path(__file__).resolve().relative_to(ROOT).as_posix()
    names = []
    for n in repo_files():
        if n == this or Path(n).suffix.lower() in _BINARY_SUFFIXES or (ROOT / n).stat().st_size > 2_000_000:
            continue
        names.append(n)
    return names


def read_text(rel: str) -> str | None:
    try:
        return (ROOT / rel).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def test_nothing_cites_a_document_that_is_not_in_the_repository():
    missing = []
    for rel in text_files():
        text = read_text(rel)
        if text is None:
            continue
        base = str(Path(rel).parent) if "/" in rel else ""
        for m in _OUTSIDE.finditer(text):
            missing.append(f"{rel}: cites {m.group(0)!r}, outside the repository")
        for m in _DOC_CITE.finditer(text):
            cited = m.group(1)
            candidates = [resolve(base, cited), resolve("", cited)]
            if any(c is not None and exists(c) for c in candidates):
                continue
            line = text.count("\n", 0, m.start()) + 1
            missing.append(f"{rel}:{line}: cites {cited}, which is not in the repository")
    assert not missing, "citations of documents that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_every_section_cited_by_name_exists():
    wrong = []
    for rel in text_files():
        text = read_text(rel)
        if text is None:
            continue
        # Comment markers and line breaks removed, so a citation may wrap across comment lines.
        flat = re.sub(r"\s+", " ", _COMMENT_MARK.sub("", text))
        base = str(Path(rel).parent) if "/" in rel else ""
        for m in _SECTION_CITE.finditer(flat):
            doc, section = m.group(1), m.group(2)
            doc = "README.md" if doc == "README" else doc
            target = next((c for c in (resolve(base, doc), resolve("", doc)) if c is not None and c in repo_files()), None)
            if target is None:
                continue  # not a document of the repository (a generated report); the test above covers documents
            if section not in heading_texts((ROOT / target).read_text(encoding="utf-8")):
                wrong.append(f'{rel}: cites {doc}, "{section}", but {target} has no such heading')
    assert not wrong, "citations of sections that do not exist:\n" + "\n".join(sorted(set(wrong)))


def test_design_has_the_sections_the_code_cites():
    titles = heading_texts((ROOT / "docs" / "design.md").read_text(encoding="utf-8"))
    absent = [s for s in DESIGN_SECTIONS_CITED if s not in titles]
    assert not absent, f"docs/design.md lacks the sections {absent}, which code and tests cite by name"


def test_operating_lists_every_serve_flag_and_no_other():
    text = (ROOT / "docs" / "operating.md").read_text(encoding="utf-8")
    section = text.split("\n## Flags", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            first_cell = line.split("|")[1]
            listed.update(re.findall(r"`--([a-z0-9-]+)`", first_cell))
    flags = {f.name.replace("_", "-") for f in dataclasses.fields(Settings)}
    assert flags - listed == set(), f"docs/operating.md, Flags, does not list --{', --'.join(sorted(flags - listed))}"
    assert listed - flags == set(), f"docs/operating.md, Flags, lists --{', --'.join(sorted(listed - flags))}, which `mnist-edge serve` does not have"
