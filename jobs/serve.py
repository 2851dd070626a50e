"""Ray job entry point for the serve stage.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/serve.py --config configs/demo.yaml [section.key=value ...]

Same as `aigc serve`: joins the cluster from RAY_ADDRESS (set by `ray job submit`), or starts a local one.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from aigc.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
