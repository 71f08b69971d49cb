"""The README and docs/: the code example runs and prints what it says, and every link works in a plain clone."""

import contextlib
import glob
import io
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a reader of a fresh clone sees first, and the depth behind it: every reference in these must resolve
# inside the repository.
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# The experiments' READMEs quote recorded output (paths of the machine a run ran on), so only their Markdown
# links are checked.
EXPERIMENT_READMES = sorted(os.path.relpath(p, ROOT)
                            for p in glob.glob(os.path.join(ROOT, "experiments", "*", "README.md")))
# Places that exist only on a development machine, never in a clone.
OUTSIDE = ("../shared", "/work/")

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
_HTML = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
# A code span that is nothing but a repository path (`dtvit/masks.py`, `tests/ops_test.py::test_x`,
# `configs/quickstart.py:tiny`, `experiments/benchmarks/`).
_REPO_PATH = re.compile(r"^(?:dtvit|tests|configs|experiments|docs)/[\w./-]*$")


def _read(rel):
  with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
    return f.read()


def links(text):
  """The targets of every Markdown link, image, reference definition and HTML link/image, outside code."""
  prose = _CODE_SPAN.sub("", _FENCE.sub("", text))
  return [m.group(1) for pattern in (_INLINE_LINK, _REF_DEF, _HTML) for m in pattern.finditer(prose)]


def code_paths(text):
  """Code spans in prose that name a repository path, with any `::test` or `:arg` suffix removed."""
  out = []
  for span in _CODE_SPAN.findall(_FENCE.sub("", text)):
    path = span.strip("`").split("::")[0]
    path = re.sub(r":[^/]*$", "", path)
    if _REPO_PATH.match(path):
      out.append(path)
  return out


def _shipped():
  """Paths a clone holds: git's tracked and not-ignored files (and their folders); None outside a git checkout
  (e.g. a copied tree), where existence on disk is the check."""
  try:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
  except (OSError, subprocess.CalledProcessError):
    return None
  files = {f for f in out.split("\0") if f}
  if not files:
    return None
  dirs = {os.path.dirname(f) for f in files}
  while any(d and os.path.dirname(d) not in dirs for d in dirs):
    dirs |= {os.path.dirname(d) for d in dirs}
  return files | dirs


def problem(doc, target, shipped):
  """Why `target`, linked from the repository file `doc`, would not work in a plain clone; None if it works."""
  if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
    return None  # a URL (https:, mailto:) or an anchor in the same page
  if any(o in target for o in OUTSIDE) or target.startswith(("/", "~")):
    return "points outside the repository"
  path = target.split("#")[0].split("?")[0]
  resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path))
  if resolved == ".." or resolved.startswith("../"):
    return "points outside the repository"
  if not os.path.exists(os.path.join(ROOT, resolved)):
    return f"{resolved} does not exist"
  if shipped is not None and resolved != "." and resolved not in shipped:
    return f"{resolved} is not in git (a clone would not have it)"
  return None


def test_link_checker_catches_what_it_should():
  shipped = _shipped()
  assert links("see [a](docs/x.md), ![p](runs/p.png \"t\")\n[r]: ../y.md\n`[no](code.md)`\n```\n[no](x)\n```") \
      == ["docs/x.md", "runs/p.png", "../y.md"]
  assert problem("README.md", "../shared/PAPER.md", shipped) == "points outside the repository"
  assert problem("README.md", "/work/main/README.md", shipped) == "points outside the repository"
  assert problem("docs/a.md", "../../elsewhere.md", shipped) == "points outside the repository"
  assert problem("README.md", "docs/no_such_page.md", shipped) == "docs/no_such_page.md does not exist"
  assert problem("docs/a.md", "../README.md#install", shipped) is None
  assert problem("README.md", "https://arxiv.org/abs/2311.16456", shipped) is None
  assert code_paths("`dtvit/masks.py`, `tests/ops_test.py::test_x`, `configs/quickstart.py:tiny`, `make test`") \
      == ["dtvit/masks.py", "tests/ops_test.py", "configs/quickstart.py"]


@pytest.mark.parametrize("doc", DOCS + EXPERIMENT_READMES)
def test_every_relative_link_resolves_inside_the_repository(doc):
  shipped = _shipped()
  bad = [f"{target}: {why}" for target in links(_read(doc)) if (why := problem(doc, target, shipped))]
  assert not bad, f"{doc} has links that do not work in a plain clone:\n" + "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS)
def test_no_reference_outside_the_repository(doc):
  """Not even as plain text or code: a reader of a clone cannot follow `../shared/...` or `/work/...`."""
  text = _read(doc)
  found = [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
           for o in OUTSIDE for m in re.finditer(re.escape(o) + r"\S*", text)]
  assert not found, f"{doc} refers to places outside the repository:\n" + "\n".join(found)


@pytest.mark.parametrize("doc", DOCS)
def test_repository_paths_in_code_spans_exist(doc):
  missing = [p for p in code_paths(_read(doc)) if not os.path.exists(os.path.join(ROOT, p))]
  assert not missing, f"{doc} names files that do not exist: {missing}"


def test_docs_are_linked_from_the_readme():
  readme_links = {os.path.normpath(t.split("#")[0]) for t in links(_read("README.md"))}
  index_links = {os.path.normpath(os.path.join("docs", t.split("#")[0])) for t in links(_read("docs/README.md"))}
  pages = {d for d in DOCS if d.startswith("docs/") and d != "docs/README.md"}
  assert "docs/README.md" in readme_links
  assert pages <= index_links, f"docs/README.md does not list {sorted(pages - index_links)}"


@pytest.mark.slow
def test_readme_example_runs_and_prints_module_steps():
  code = re.search(r"## In Python\n\n```python\n(.*?)```", _read("README.md"), re.S).group(1)
  expected = re.search(r"print\(.*\)\s+# (\{.*\})", code).group(1)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, "README.md", "exec"), {})
  assert out.getvalue().strip() == expected
