"""`python -m text_encoder` = `triptych serve text-encoder`."""

import sys

from shared.serving.launcher import stage_main
from text_encoder.app import build_app

if __name__ == "__main__":
    sys.exit(stage_main("text_encoder", build_app))
