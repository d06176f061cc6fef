"""`python -m diffusion_unet` = `triptych serve diffusion-unet`."""

import sys

from diffusion_unet.app import build_app
from shared.serving.launcher import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("diffusion_unet", build_app))
