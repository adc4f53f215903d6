"""``python -m regvi.map``: map new cells onto a trained atlas model (see :mod:`regvi.map.cli`)."""

from regvi.map.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
