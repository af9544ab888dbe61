"""``python -m meshxl``: the ``meshxl`` command."""

from meshxl.cli.entry import console

if __name__ == "__main__":
    console(prog_name="meshxl")
