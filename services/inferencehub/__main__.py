"""``python -m inferencehub``: the ``inferencehub`` command."""

from inferencehub.cli import main

if __name__ == "__main__":
    main()
