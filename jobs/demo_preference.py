"""Ray job entry point for the preference demo stage.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/demo_preference.py --config configs/demo.yaml [section.key=value ...]

Same as `aigc demo-preference`: joins the cluster from RAY_ADDRESS (set by `ray job submit`), or starts a local one.
"""

from _entry import run

if __name__ == "__main__":
    run("demo-preference")
