"""Ray job entry point for the pipeline: preprocess -> sweep -> train -> register -> deploy -> smoke test.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/demo.yaml [section.key=value ...]

Same as `aigc pipeline` (or `aigc submit pipeline --config ...`): joins the cluster from RAY_ADDRESS (set by
`ray job submit`), or starts a local one. Re-running it skips the stages whose inputs did not change.
"""

from _entry import run

if __name__ == "__main__":
    run("pipeline")
