"""The ``wa-worker`` command.

``wa-worker``            run the daemon from the environment (production)
``wa-worker dev …``      embedded reference proxy + worker (see ``wa_worker.dev``)
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "dev":
        from .dev.cli import main as dev_main  # only the command that runs is imported

        return dev_main(args[1:])
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    from .daemon import main as daemon_main  # only the command that runs is imported

    return daemon_main(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
