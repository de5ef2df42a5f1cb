"""The ``wa-worker`` command: ``run`` (the default), ``dev`` and ``doctor``."""

from __future__ import annotations

import sys
from importlib import metadata

USAGE = "usage: wa-worker [run | dev ... | doctor [--probe-batch]] [--help] [--version]"

COMMANDS = """\
commands:
  run        run the daemon, configured by the environment (and ./.env); the default
  dev ...    embedded reference proxy + worker for local development (wa-worker dev --help)
  doctor     check the configuration, the folders and the proxy before deploy (wa-worker doctor --help)

options:
  -h, --help      this text
  -V, --version   the installed version"""


def version() -> str:
    try:
        return metadata.version("wa-worker")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def help_text() -> str:
    from .config import variables_help  # pydantic loads only when help is asked for

    return (f"{USAGE}\n\nwa-worker keeps WhatsApp accounts online and relays their messages through an edge "
            f"proxy.\n\n{COMMANDS}\n\nvariables (environment or ./.env; name, default, meaning):\n"
            f"{variables_help()}\n")


def _usage_error(message: str) -> int:
    print(f"wa-worker: {message}\n{USAGE}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "dev":
        from .dev.cli import main as dev_main  # only the command that runs is imported

        return dev_main(args[1:])
    if args and args[0] == "doctor":
        from .doctor import main as doctor_main  # only the command that runs is imported

        return doctor_main(args[1:])
    if args and args[0] in ("-h", "--help", "help"):
        print(help_text(), end="")
        return 0
    if args and args[0] in ("-V", "--version"):
        print(f"wa-worker {version()}")
        return 0
    if args and args[0] == "run":
        args = args[1:]
    if args:
        # e.g. --port 4000: the daemon reads PORT from the environment only
        hint = " (settings come from the environment: PORT=4000 wa-worker)" if args[0].startswith("--") else ""
        return _usage_error(f"unknown argument {args[0]!r}{hint}")
    from .daemon import main as daemon_main  # only the command that runs is imported

    return daemon_main([])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
