"""`python -m vae_decoder` = `triptych serve vae-decoder`."""

import sys

from shared.serving.launcher import stage_main
from vae_decoder.app import build_app

if __name__ == "__main__":
    sys.exit(stage_main("vae_decoder", build_app))
