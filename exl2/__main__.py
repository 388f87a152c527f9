"""``python -m exl2``, and the ``exl2`` command's entry point: runs :mod:`exl2.cli`, or, when a
package of the ``cli`` extra is missing, says which in one line (exit 2) instead of a traceback."""

from __future__ import annotations

import sys

from .extras import missing_extra


def main() -> None:
    try:
        from .cli import main as cli_main
    except ModuleNotFoundError as e:
        hint = missing_extra(e)
        if hint is None:
            raise
        print(f"exl2: error: the exl2 command needs the cli extra: {hint}", file=sys.stderr)
        sys.exit(2)
    cli_main()


if __name__ == "__main__":
    main()
