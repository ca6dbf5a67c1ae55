"""Compile one Python source file without writing anything; exit 1 on a syntax error.

Used by the demo as a real command over the standard library: unlike
``python -m py_compile`` it writes no ``.pyc`` file into the interpreter's
tree.
"""

from __future__ import annotations

import sys
import warnings


def check(path: str) -> None:
    """Compile the file at ``path``.

    Raises:
        SyntaxError: The file is not valid Python for this interpreter.
        OSError: The file cannot be read.
    """
    with open(path, "rb") as source, warnings.catch_warnings():
        # Warnings about questionable but valid code are not failures.
        warnings.simplefilter("ignore")
        compile(source.read(), path, "exec", dont_inherit=True)


def main() -> int:
    """Check the file named on the command line; return the exit status."""
    try:
        check(sys.argv[1])
    except SyntaxError as error:
        print(f"{error.filename}:{error.lineno}: {error.msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
