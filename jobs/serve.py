"""Ray job entry point for the serve stage.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/serve.py --config configs/demo.yaml [section.key=value ...]

Same as `aigc serve`: joins the cluster from RAY_ADDRESS (set by `ray job submit`), or starts a local one.
As a submitted job it deploys the app, waits until it answers and ends (SUCCEEDED); the app keeps serving on
the cluster until `serve shutdown` (or a redeploy) replaces it. Run directly, it blocks until Ctrl-C.
"""

from _entry import run

if __name__ == "__main__":
    run("serve")
