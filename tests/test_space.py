"""Search spaces and sweep checks: every distribution and every bad entry, without a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aigc.config import ConfigError, load_config
from aigc.tune.space import load_space, resolve, to_param_space

ROOT = Path(__file__).resolve().parents[1]


def _space_file(tmp_path: Path, entries: dict) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(entries))
    return p


def _sample(space, seed: int = 0, n: int = 200) -> list[dict]:
    """``n`` trials' config values drawn the way Tune draws them (grid keys: every value in turn)."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants  # Tune's own sampler

    np.random.seed(seed)
    out = []
    for _ in range(n):
        for _, cfg in generate_variants(to_param_space(space)):
            out.append(resolve(space, cfg))
    return out


def test_every_distribution_samples_within_its_bounds(tmp_path):
    space = load_space(
        _space_file(tmp_path, {
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "lora.r": {"choice": [4, 8]},
            "lora.dropout": {"uniform": [0.0, 0.2]},
            "train.warmup_steps": {"quniform": [0, 20, 5]},
            "train.seed": {"randint": [0, 3]},
            "train.batch_size": {"grid": [8, 16]},
            "lora.alpha": {"multiple_of": ["lora.r", {"choice": [1, 2, 4]}]},
        }),
        load_config(),
    )  # fmt: skip
    values = _sample(space)
    assert len(values) == 400  # 200 samples x 2 grid values
    lrs = [v["train.lr"] for v in values]
    assert 1e-4 <= min(lrs) < 1e-3 and 1e-3 < max(lrs) <= 1e-2  # a log scale reaches both decades
    assert {v["lora.r"] for v in values} == {4, 8}
    assert all(0.0 <= v["lora.dropout"] <= 0.2 for v in values)
    assert {v["train.warmup_steps"] for v in values} <= {0, 5, 10, 15, 20}
    assert {v["train.seed"] for v in values} == {0, 1, 2}  # high is exclusive
    assert {v["train.batch_size"] for v in values} == {8, 16}
    assert all(v["lora.alpha"] / v["lora.r"] in (1, 2, 4) for v in values)
    assert {v["lora.alpha"] for v in values} == {4, 8, 16, 32}
    cfg = load_config()
    from aigc.config import with_values

    assert with_values(cfg, values[0]).lora.alpha == values[0]["lora.alpha"]  # a trial's values make a valid config


def test_shipped_space_files_load():
    cfg = load_config()
    for path in sorted((ROOT / "tune_spaces").glob("*.yaml")):
        assert load_space(path, cfg).params, path


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            {"train.learning_rate": {"choice": [1e-3]}},
            r"train.learning_rate: .*unknown key|train.learning_rate.*no field",
        ),
        ({"train.lr": {"normal": [0, 1]}}, r"train.lr: unknown distribution 'normal'"),
        ({"train.lr": [1e-3, 1e-2]}, r"train.lr: expected one distribution"),
        ({"train.lr": {"choice": []}}, r"train.lr.choice: expected a non-empty list"),
        ({"train.lr": {"uniform": [1e-2, 1e-3]}}, r"train.lr.uniform: impossible bounds"),
        ({"train.lr": {"uniform": [1e-3]}}, r"train.lr.uniform: expected \[low, high\]"),
        ({"train.lr": {"loguniform": [0, 1e-2]}}, r"train.lr.loguniform: bounds must be > 0"),
        ({"train.seed": {"randint": [0, 2.5]}}, r"train.seed.randint: bounds must be integers"),
        ({"train.seed": {"randint": [3, 3]}}, r"train.seed.randint: impossible bounds"),
        ({"train.warmup_steps": {"quniform": [0, 20]}}, r"train.warmup_steps.quniform: expected \[low, high, q\]"),
        ({"train.warmup_steps": {"quniform": [1, 4, 5]}}, r"train.warmup_steps.quniform: no multiple of q=5"),
        ({"lr": {"choice": [1e-3]}}, r"lr: expected a dotted config key"),
        ({"lora.r": {"choice": [8, 0]}}, r"lora.r: .*\n  lora.r: Input should be greater than or equal to 1"),
        (
            {"lora.alpha": {"multiple_of": ["lora.r", {"choice": [2]}]}},
            r"lora.alpha.multiple_of: 'lora.r' is not a key",
        ),
        ({"lora.alpha": {"multiple_of": ["lora.r"]}}, r"lora.alpha.multiple_of: expected \[other.key"),
        (
            {"lora.r": {"choice": [4]}, "lora.alpha": {"multiple_of": ["lora.r", {"uniform": [2, 1]}]}},
            r"lora.alpha.multiple_of.uniform: impossible bounds",
        ),
        (
            {"lora.r": {"choice": [4]}, "lora.alpha": {"multiple_of": ["lora.r", {"choice": [-1]}]}},
            r"lora.alpha: .*greater than 0",
        ),
    ],
)
def test_every_bad_entry_is_named(tmp_path, entries, message):
    with pytest.raises(ConfigError, match=message):
        load_space(_space_file(tmp_path, entries), load_config())


def test_missing_or_empty_space_file(tmp_path):
    with pytest.raises(ConfigError, match="search-space file not found"):
        load_space(tmp_path / "nope.yaml", load_config())
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_space(empty, load_config())


def _sweep_cfg(tmp_path: Path, entries: dict, *overrides: str):
    return load_config(None, [f"tune.space={_space_file(tmp_path, entries)}", *overrides])


def test_metric_the_trainer_does_not_report_fails(tmp_path):
    from aigc.tune.search import check_sweep

    cfg = _sweep_cfg(tmp_path, {"train.lr": {"choice": [1e-3]}}, "tune.metric=eval_accuracy")
    with pytest.raises(ConfigError, match=r"tune.metric: the trainer does not report 'eval_accuracy'; use one of"):
        check_sweep(cfg)


def test_grid_search_enumerates_choice_and_grid_keys_within_num_samples(tmp_path):
    from aigc.tune.search import check_sweep, trial_count

    entries = {"train.lr": {"grid": [1e-3, 3e-3]}, "lora.r": {"choice": [4, 8, 16]}}
    cfg = _sweep_cfg(tmp_path, entries, "tune.search=grid", "tune.num_samples=6")
    assert trial_count(cfg, check_sweep(cfg)) == 6
    too_big = _sweep_cfg(tmp_path, entries, "tune.search=grid", "tune.num_samples=4")
    with pytest.raises(ConfigError, match=r"6 combinations but tune.num_samples=4"):
        check_sweep(too_big)
    continuous = _sweep_cfg(tmp_path, {"train.lr": {"uniform": [1e-3, 2e-3]}}, "tune.search=grid")
    with pytest.raises(ConfigError, match=r"train.lr: tune.search=grid can only enumerate choice/grid keys"):
        check_sweep(continuous)
    random = _sweep_cfg(tmp_path, entries, "tune.num_samples=3")
    assert trial_count(random, check_sweep(random)) == 6  # random search crosses its samples with the grid keys


def test_optuna_refuses_grid_keys_and_samples_conditional_keys(tmp_path):
    from aigc.tune.search import build_search, check_sweep
    from aigc.tune.space import to_param_space

    with pytest.raises(ConfigError, match=r"train.lr: Optuna cannot take grid keys"):
        check_sweep(_sweep_cfg(tmp_path, {"train.lr": {"grid": [1e-3]}}, "tune.search=optuna"))
    entries = {
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "lora.r": {"choice": [4, 8]},
        "lora.alpha": {"multiple_of": ["lora.r", {"choice": [1, 2]}]},
    }
    cfg = _sweep_cfg(tmp_path, entries, "tune.search=optuna", "tune.seed=3")
    space = check_sweep(cfg)
    alg, param_space = build_search(cfg, to_param_space(space))
    assert alg.set_search_properties(cfg.tune.metric, cfg.tune.mode, param_space)
    values = resolve(space, alg.suggest("t1"))
    assert set(values) == {"train.lr", "lora.r", "lora.alpha"} and values["lora.alpha"] / values["lora.r"] in (1, 2)


def test_scheduler_budget_counts_reports(tmp_path):
    from aigc.tune.search import build_scheduler, check_sweep, max_reports

    cfg = _sweep_cfg(tmp_path, {"train.batch_size": {"choice": [8, 16]}}, "train.epochs=2", "train.eval_every_steps=2")
    # 64 rows, batch 8 -> 8 steps an epoch: 4 mid-epoch evaluations + the epoch end, twice
    assert max_reports(cfg, check_sweep(cfg), 64) == 2 * (1 + 8 // 2)
    assert build_scheduler(cfg, 10)._max_t == 10
    assert build_scheduler(load_config(None, ["tune.scheduler=none"]), 10) is None


def test_trial_budget_replaces_the_training_schedule(tmp_path):
    """tune.epochs and tune.eval_every_steps set the trials' schedule (and ASHA's budget), not the final run's."""
    from aigc.tune.results import best_config
    from aigc.tune.search import check_sweep, max_reports, trial_base

    cfg = _sweep_cfg(tmp_path, {"train.lr": {"loguniform": [1e-4, 1e-2]}}, "train.epochs=3", "tune.epochs=1",
                     "tune.eval_every_steps=2")  # fmt: skip
    trial = trial_base(cfg)
    assert (trial.train.epochs, trial.train.eval_every_steps) == (1, 2)
    assert (cfg.train.epochs, cfg.train.eval_every_steps) == (3, None)  # the config itself is unchanged
    # 64 rows, batch 8 -> 8 steps: 4 mid-epoch evaluations + the epoch end, once (not 3 epochs x 1 report)
    assert max_reports(trial, check_sweep(cfg), 64) == 1 + 8 // 2
    chosen = best_config(trial, {"train.lr": 0.003})  # what best_config.yaml holds: the trial's schedule
    assert (chosen.train.epochs, chosen.train.eval_every_steps, chosen.train.lr) == (1, 2, 0.003)
    plain = _sweep_cfg(tmp_path, {"train.lr": {"loguniform": [1e-4, 1e-2]}})
    assert trial_base(plain) is plain
    with pytest.raises(ConfigError, match=r"tune.epochs: Input should be greater than or equal to 1"):
        load_config(None, ["tune.epochs=0"])


def test_sweep_plots_use_a_log_axis_only_for_a_wide_positive_range():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aigc.tune.results import _log_if_wide

    fig, axes = plt.subplots(1, 3)
    try:
        _log_if_wide(axes[0], [5.1, 0.1, 0.0014, float("nan")])  # the base model's loss down to a trained one
        _log_if_wide(axes[1], [0.9, 0.5, 0.2])
        _log_if_wide(axes[2], [0.0, 1.0, 100.0])  # exact match can be 0: no log axis
        assert [ax.get_yscale() for ax in axes] == ["log", "linear", "linear"]
    finally:
        plt.close(fig)


def test_concurrency_from_cluster_resources():
    from aigc.tune.concurrency import plan_concurrency

    one = load_config(None, ["tune.num_workers_per_trial=1", "train.cpus_per_worker=1"])
    plan = plan_concurrency(one, 4, {"CPU": 3.0})
    assert (plan.at_once, plan.line()) == (2, "4 trials, 2 at a time, 1 worker each")  # one CPU kept for data
    assert plan_concurrency(one, 1, {"CPU": 16.0}).at_once == 1  # never more than the trials
    capped = load_config(None, ["tune.max_concurrent_trials=2"])
    assert plan_concurrency(capped, 8, {"CPU": 16.0}).at_once == 2
    two = load_config(None, ["tune.num_workers_per_trial=2", "train.cpus_per_worker=1"])
    assert plan_concurrency(two, 8, {"CPU": 8.0}).line() == "8 trials, 3 at a time, 2 workers each"  # 2.25 each
    gpu = load_config(None, ["tune.num_workers_per_trial=2", "train.use_gpu=true"])
    assert plan_concurrency(gpu, 8, {"CPU": 32.0, "GPU": 4.0}).at_once == 2
    with pytest.raises(
        ConfigError, match=r"one trial needs 2.25 CPUs and 2 GPUs but the cluster has 32 CPUs and 1 GPUs"
    ):
        plan_concurrency(gpu, 8, {"CPU": 32.0, "GPU": 1.0})


def test_pbt_searches_only_keys_that_can_change_mid_run(tmp_path, monkeypatch):
    import ray.tune.schedulers
    from ray.tune.schedulers import PopulationBasedTraining

    from aigc.tune.search import build_scheduler, check_sweep, trial_base

    built = {}

    class Recorded(PopulationBasedTraining):  # what the platform asks of Ray's public constructor
        def __init__(self, **kwargs):
            built.update(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(ray.tune.schedulers, "PopulationBasedTraining", Recorded)
    entries = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "lora.dropout": {"choice": [0.0, 0.05, 0.1]}}
    cfg = _sweep_cfg(tmp_path, entries, "tune.scheduler=pbt", "tune.perturbation_interval=2")
    assert isinstance(build_scheduler(cfg, 10, check_sweep(cfg)), PopulationBasedTraining)
    assert {k: built[k] for k in ("time_attr", "perturbation_interval", "metric", "mode")} == {
        "time_attr": "epoch", "perturbation_interval": 2, "metric": "eval_loss", "mode": "min"}  # fmt: skip
    assert built["hyperparam_mutations"]["lora.dropout"] == [0.0, 0.05, 0.1]
    assert built["hyperparam_mutations"]["train.lr"].lower == 1e-4  # a perturbed lr is resampled from the same range
    assert trial_base(cfg) is cfg  # epochs: the loop checkpoints at every epoch end already
    shipped = load_config(None, [f"tune.space={ROOT / 'tune_spaces' / 'pbt_lr.yaml'}", "tune.scheduler=pbt"])
    assert check_sweep(shipped).keys == ["train.lr", "lora.dropout"]

    fixed = {**entries, "lora.r": {"choice": [4, 8]}, "lora.alpha": {"multiple_of": ["lora.r", {"choice": [1, 2]}]}}
    message = r"lora.alpha, lora.r: cannot change in the middle of a run, so tune.scheduler=pbt cannot perturb them"
    with pytest.raises(ConfigError, match=message + r"; PBT searches only train.lr, train.weight_decay"):
        check_sweep(_sweep_cfg(tmp_path, fixed, "tune.scheduler=pbt"))
    with pytest.raises(ConfigError, match=r"tune.scheduler=pbt chooses new values itself: use tune.search=random"):
        check_sweep(_sweep_cfg(tmp_path, entries, "tune.scheduler=pbt", "tune.search=optuna"))

    steps = _sweep_cfg(tmp_path, entries, "tune.scheduler=pbt", "tune.perturbation_unit=step",
                       "tune.perturbation_interval=6")  # fmt: skip
    check_sweep(steps)
    assert trial_base(steps).train.checkpoint_every_steps == 6  # a checkpoint at every perturbation
    assert build_scheduler(steps, 10, check_sweep(steps))._time_attr == "step"
    # mid-epoch evaluations (tune.eval_every_steps): each report gets a checkpoint, PBT's hand-over
    evals = _sweep_cfg(tmp_path, entries, "tune.scheduler=pbt", "tune.eval_every_steps=5")
    check_sweep(evals)
    assert trial_base(evals).train.checkpoint_every_steps == 5
    with pytest.raises(ConfigError, match=r"a trial evaluates every 5 steps but checkpoints every 2 "):
        check_sweep(_sweep_cfg(tmp_path, entries, "tune.scheduler=pbt", "tune.eval_every_steps=5",
                               "train.checkpoint_every_steps=2"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"tune.perturbation_interval=6 steps is not a multiple of the trials' "
                                          r"evaluation interval \(4 steps"):  # fmt: skip
        check_sweep(_sweep_cfg(tmp_path, entries, "tune.scheduler=pbt", "tune.perturbation_unit=step",
                               "tune.perturbation_interval=6", "tune.eval_every_steps=4"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"tune.perturbation_interval=6 steps is not a multiple of "
                                          r"train.checkpoint_every_steps=4"):  # fmt: skip
        check_sweep(_sweep_cfg(tmp_path, entries, "tune.scheduler=pbt", "tune.perturbation_unit=step",
                               "tune.perturbation_interval=6", "train.checkpoint_every_steps=4"))  # fmt: skip
