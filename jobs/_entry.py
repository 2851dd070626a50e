"""Shared by the job scripts: put ``platform/`` on the path and run one ``aigc`` stage with argv."""

import os
import sys


def run(stage: str) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))
    from aigc.cli import main

    sys.exit(main([stage, *sys.argv[1:]]))
