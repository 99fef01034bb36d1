"""The ``astmarks`` command: the test rig's command line (``harness.cli``).

The library installs without the rig's dependencies; the command then says
which extra to install rather than failing with an import error.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from harness.cli import main as rig_main
    except ModuleNotFoundError as exc:
        print(
            f"astmarks: the command line is the test rig's, and it needs {exc.name!r}: "
            "pip install 'astmarks[rig]' (or 'make setup' in a checkout)",
            file=sys.stderr,
        )
        return 2
    return rig_main()


if __name__ == "__main__":
    sys.exit(main())
