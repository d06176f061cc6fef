"""`python -m central` = `triptych serve central`."""

import sys

from central.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "central", *sys.argv[1:]]))
