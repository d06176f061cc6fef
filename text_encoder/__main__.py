"""`python -m text_encoder` = `triptych serve text-encoder`."""

import sys

from central.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "text-encoder", *sys.argv[1:]]))
