"""`python -m vae_decoder` = `triptych serve vae-decoder`."""

import sys

from central.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "vae-decoder", *sys.argv[1:]]))
