"""``python -m meshxl.cli``: the ``meshxl`` command."""

from meshxl.cli.entry import console

if __name__ == "__main__":  # pragma: no cover
    console()
