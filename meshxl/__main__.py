"""``python -m meshxl``: the ``meshxl`` command."""

from meshxl.cli.entry import main

if __name__ == "__main__":
    main(prog_name="meshxl")
