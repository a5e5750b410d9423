"""``python -m inferencehub.inference``: run one inference replica."""

import sys

from inferencehub.cli import main

if __name__ == "__main__":
    main(["inference", *sys.argv[1:]])
