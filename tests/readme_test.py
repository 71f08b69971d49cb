"""The README's code example runs and prints what it says it prints."""

import contextlib
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_readme_example_runs_and_prints_module_steps():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  code = re.search(r"## Six lines\n\n```python\n(.*?)```", text, re.S).group(1)
  expected = re.search(r"print\(.*\)\s+# (\{.*\})", code).group(1)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, "README.md", "exec"), {})  # pylint: disable=exec-used
  assert out.getvalue().strip() == expected
