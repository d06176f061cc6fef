"""`python -m diffusion_unet` = `triptych serve diffusion-unet`."""

import sys

from central.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "diffusion-unet", *sys.argv[1:]]))
