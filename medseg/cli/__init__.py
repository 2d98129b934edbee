"""The ``medseg`` command: parse arguments, call one function per subcommand, map errors to exit codes.

Exit status: 0 success, 2 bad input (``medseg: error: <file>: <problem>``), 1 internal failure,
130 interrupted. ``--debug`` prints the traceback.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

from medseg.cli.parser import build_parser
from medseg.errors import MedsegError, one_line
from medseg.logs import setup_logging

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medseg`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(debug=args.debug, quiet=args.quiet)
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # output paths are printed as the bytes they are, even if not UTF-8
        reconfigure(errors="surrogateescape")
    try:
        return int(args.func(args) or 0)
    except MedsegError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"medseg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("medseg: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback for users
        if args.debug:
            traceback.print_exc()
        print(f"medseg: error: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
