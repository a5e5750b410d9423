"""``python -m inferencehub.gateway``: run the gateway."""

import sys

from inferencehub.cli import main

if __name__ == "__main__":
    main(["gateway", *sys.argv[1:]])
