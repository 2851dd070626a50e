"""Ray job entry point for the generate stage.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/generate.py --config configs/demo.yaml [section.key=value ...]

Same as `aigc generate`: joins the cluster from RAY_ADDRESS (set by `ray job submit`), or starts a local one.
"""

from _entry import run

if __name__ == "__main__":
    run("generate")
