"""``python -m exl2.cli``: the same as the ``exl2`` command."""

from . import main

main()
