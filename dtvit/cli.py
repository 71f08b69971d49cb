"""What the command lines share: absl flags parsed into a `FlagValues` of each call's own, so a command's
`main(argv)` can run in-process (tests) as often as wanted, and a mistake in the command line gets one line and
exit status 2. (Mistakes found after parsing: `loader.user_errors`, status 1.)"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import flags

USAGE_EXIT_STATUS = 2
_HELP = ("-h", "-help", "--help", "--helpfull", "-?")


def parse(prog: str, define: Callable[[flags.FlagValues], None], argv: Sequence[str] | None, *, doc: str = "",
          positional: str = "") -> tuple[flags.FlagValues, list[str]]:
  """(the flags of `python -m <prog> *argv`, defined by `define(values)`; its positional arguments). `argv`
  leaves out the program (None: `sys.argv[1:]`); positional arguments are refused unless `positional` names
  them (for the usage line)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  values = flags.FlagValues()
  define(values)
  if any(a in _HELP for a in argv):
    print(f"usage: python -m {prog} [flags] {positional}\n\n{doc.strip()}\n\nflags:\n{values.get_help()}")
    sys.exit(0)
  try:
    rest = values([prog, *argv])[1:]
    if rest and not positional:
      raise flags.Error(f"unexpected arguments {rest}; every argument is a --flag=value.")
  except flags.Error as e:
    print(f"error: {prog}: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(USAGE_EXIT_STATUS)
  return values, rest
