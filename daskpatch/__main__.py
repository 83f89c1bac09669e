"""``python -m daskpatch``: the command line (see :mod:`daskpatch.cli`)."""

from daskpatch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
