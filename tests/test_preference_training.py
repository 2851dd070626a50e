"""DPO and ORPO through the training loop (aigc.train.loop) on the tiny model, and the checks before a run."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from aigc.config import DataConfig, LoraConfig, ModelConfig, TrainConfig, load_config
from aigc.data.pair_tokenizing import TokenizePairs
from aigc.errors import ConfigError, DataError
from aigc.train.checks import check_preference
from aigc.train.loop import run_worker
from aigc.train.worker_config import WorkerConfig

TINY = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-base")


def _pairs(numbers: range) -> list[dict]:
    """A learnable preference: the chosen answer always says the order ships, the rejected one that it is lost."""
    return [{"instruction": f"Where is order #{n}?", "chosen": f"Order #{n} ships today.",
             "rejected": f"Order #{n} was lost, sorry."} for n in numbers]  # fmt: skip


def _rows(tk: TokenizePairs, records: list[dict]) -> dict[str, list]:
    table = tk({"raw": np.array([json.dumps(r) for r in records])})
    assert all(table["ok"].to_pylist())
    return {k: table[k].to_pylist() for k in ("input_ids", "labels", "rejected_ids", "rejected_labels")}


class _Shard:
    """A dataset shard as the loop iterates it (Ray Data's ``iter_torch_batches``), from rows in memory."""

    def __init__(self, rows: dict[str, list]) -> None:
        self.rows = rows

    def iter_torch_batches(self, batch_size, collate_fn, local_shuffle_buffer_size=None, local_shuffle_seed=None):
        n = len(self.rows["input_ids"])
        order = np.random.default_rng(local_shuffle_seed).permutation(n) if local_shuffle_seed is not None else range(n)
        order = list(order)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield collate_fn({k: np.array([v[j] for j in idx], dtype=object) for k, v in self.rows.items()})


class _Checkpoint:
    def __init__(self, path: str) -> None:
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class _Crash(Exception):
    pass


class _Context:
    """One worker in this process: rank 0 of 1, on CPU; reports kept in a list, the last checkpoint copied to
    ``keep`` (and resumed from when ``resume``); ``crash_after`` raises after that optimizer step."""

    def __init__(self, shards: dict[str, _Shard], keep: Path | None = None, resume: bool = False,
                 crash_after: int | None = None) -> None:  # fmt: skip
        self.shards, self.reports, self.keep, self.resume, self.crash_after = shards, [], keep, resume, crash_after

    def world_rank(self):
        return 0

    def world_size(self):
        return 1

    def device(self):
        import torch

        return torch.device("cpu")

    def prepare_model(self, model, wc):
        return model

    def dataset_shard(self, name):
        return self.shards[name]

    def checkpoint(self):
        return _Checkpoint(str(self.keep)) if self.resume else None

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))
        if checkpoint_dir and self.keep is not None:
            shutil.rmtree(self.keep, ignore_errors=True)
            shutil.copytree(checkpoint_dir, self.keep)

    def after_step(self, step, resumed):
        if step == self.crash_after:
            raise _Crash(f"killed after step {step}")


def _train(method: str, ctx: dict | None = None, **train) -> list[dict]:
    tk = TokenizePairs(ModelConfig(name_or_path=TINY), DataConfig(preference=True))
    shards = {
        "train": _Shard(_rows(tk, _pairs(range(1000, 1032)))),
        "val": _Shard(_rows(tk, _pairs(range(5000, 5016)))),
    }
    settings = {"epochs": 2, "batch_size": 8, "lr": 2e-3, "num_workers": 1, "warmup_ratio": 0.0,
                "lr_scheduler": "constant", "log_every_steps": 100, **train}  # fmt: skip
    tc = TrainConfig(preference={"method": method, "beta": 0.5}, **settings)
    wc = WorkerConfig(model=ModelConfig(name_or_path=TINY), lora=LoraConfig(r=8, alpha=16, dropout=0.0), train=tc,
                      micro_per_epoch=4, pad_id=tk.tok.pad_token_id, has_val=True, tokenizer=tk.tok)  # fmt: skip
    context = _Context(shards, **(ctx or {}))
    assert run_worker(wc, context) is None
    return context.reports


@pytest.fixture(scope="module")
def dpo_run() -> list[dict]:
    """The reports of an uninterrupted 2-epoch DPO run."""
    return _train("dpo")


def test_dpo_learns_the_preference_held_out_pairs_rank_the_chosen_answer_higher(dpo_run):
    reports = dpo_run
    assert [r["step"] for r in reports] == [4, 8]  # one report (and checkpoint) per epoch, as for SFT
    last = reports[-1]
    # held-out pairs: at the start policy == reference (every margin 0, accuracy 0); at the end well above chance
    assert last["eval_reward_accuracy"] >= 0.9
    assert last["eval_reward_margin"] > 0.5
    assert last["initial_eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # a fresh adapter is its base
    assert last["eval_loss"] < 0.5 * math.log(2)
    assert last["eval_pairs"] == 16
    assert last["train_reward_accuracy"] >= 0.9 and "train_logps_chosen" in last
    # the chosen answer gained more probability against the base model than the rejected one
    assert last["eval_rewards_chosen"] > last["eval_rewards_rejected"]


def test_orpo_runs_through_the_same_loop_and_ranks_held_out_pairs():
    [last] = _train("orpo", epochs=1)
    assert last["eval_reward_accuracy"] >= 0.9 and last["eval_loss"] < last["initial_eval_loss"] - 1.0


def test_a_dpo_run_killed_after_an_epoch_resumes_to_the_same_metrics(dpo_run, tmp_path):
    """Checkpoints and resume are SFT's: a DPO run that dies in epoch 2 and resumes from the epoch-1 checkpoint
    ends where an uninterrupted run ends."""
    straight = dpo_run
    with pytest.raises(_Crash, match="killed after step 6"):
        _train("dpo", ctx={"keep": tmp_path / "ckpt", "crash_after": 6})
    resumed = _train("dpo", ctx={"keep": tmp_path / "ckpt", "resume": True})
    assert [r["step"] for r in resumed] == [8]  # epoch 2 only: the steps of epoch 1 are not trained again
    for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_logps_chosen", "eval_logps_rejected"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], rel=1e-4, abs=1e-5), key


def test_a_dpo_round_from_an_adapter_starts_from_it_and_measures_against_it(dpo_run, tmp_path):
    """train.init_adapter: the policy starts with the adapter's weights, and the DPO reference is that adapter
    (a frozen second copy), not the bare base; the checkpoint holds the trained adapter only."""
    _train("dpo", ctx={"keep": tmp_path / "first"})
    start = tmp_path / "first" / "adapter"
    assert (start / "adapter_config.json").is_file() and not (start / "reference").exists()
    # lr ~0: the policy stays the starting adapter, so it scores what the first run's last eval scored, and
    # every margin against the reference (that same adapter) is 0: the loss is ln 2
    [last] = _train("dpo", ctx={"keep": tmp_path / "second"}, epochs=1, lr=1e-12, init_adapter=str(start))
    first = dpo_run[-1]
    assert last["initial_eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert last["eval_reward_margin"] == pytest.approx(0.0, abs=1e-4)
    for key in ("eval_logps_chosen", "eval_logps_rejected"):
        assert last[key] == pytest.approx(first[key], rel=1e-4), key
    saved = {p.name for p in (tmp_path / "second" / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "reference" not in saved


def test_init_adapter_is_pinned_on_the_driver_and_its_settings_replace_the_lora_section(tmp_path):
    from aigc.registry import Registry
    from aigc.train.init_adapter import resolve_init_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": True,
        "target_modules": ["v_proj", "q_proj"], "modules_to_save": None}))  # fmt: skip
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    Registry(str(tmp_path / "reg")).register("bot", str(adapter), TINY)
    Registry(str(tmp_path / "reg")).register("bot", str(adapter), TINY)  # same files: still v1
    Registry(str(tmp_path / "reg")).promote("bot:v1", "prod")
    cfg = resolve_init_adapter(_cfg(f"registry_dir={tmp_path / 'reg'}", "train.init_adapter=bot:prod"))
    assert cfg.train.init_adapter == str(tmp_path / "reg" / "bot" / "v1" / "adapter")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.use_rslora) == (4, 8.0, True)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert resolve_init_adapter(_cfg(f"train.init_adapter={adapter}")).train.init_adapter == str(adapter)
    with pytest.raises(ConfigError, match="train.init_adapter 'bot:v9' is neither an adapter directory"):
        resolve_init_adapter(_cfg(f"registry_dir={tmp_path / 'reg'}", "train.init_adapter=bot:v9"))
    with pytest.raises(ConfigError, match="init_adapter continues a LoRA adapter: it needs train.method lora"):
        _cfg("train.init_adapter=bot:v1", "train.method=full")


def _cfg(*extra: str):
    return load_config(None, [f"model.name_or_path={TINY}", *extra])


def test_preference_settings_are_checked_before_any_cluster_work():
    with pytest.raises(
        ConfigError, match="train.preference.method=dpo trains on preference pairs: set data.preference=true"
    ):
        check_preference(_cfg("train.preference.method=dpo"))
    with pytest.raises(ConfigError, match="supervised fine-tuning cannot use: set train.preference.method=dpo or orpo"):
        check_preference(_cfg("data.preference=true"))
    with pytest.raises(ConfigError, match="use train.method=lora or qlora, or train.preference.method=orpo"):
        check_preference(_cfg("data.preference=true", "train.preference.method=dpo", "train.method=full"))
    with pytest.raises(ConfigError, match="train.preference.method=dpo runs with train.strategy=ddp only"):
        check_preference(_cfg("data.preference=true", "train.preference.method=dpo", "train.strategy=fsdp"))
    check_preference(_cfg("data.preference=true", "train.preference.method=orpo", "train.method=full"))


def test_a_two_worker_dpo_run_on_preference_shards_publishes_its_pair_metrics(ray_cluster, tmp_path):
    """The whole path: preference rows preprocessed by the Ray Data job, DPO in Ray Train on 2 DDP workers (the
    reference forward with adapters disabled inside each), the best checkpoint published with its metrics."""
    from aigc.data.preprocess import preprocess
    from aigc.train.checks import check
    from aigc.train.trainer import run_training

    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _pairs(range(1000, 1064))))
    cfg = load_config(None, [
        f"data.path={src}", f"model.name_or_path={TINY}", f"output_dir={tmp_path / 'out'}",
        f"registry_dir={tmp_path / 'registry'}", "data.val_fraction=0.25", "data.tokenizer_actors=1",
        "data.preference=true", "data.max_length=128", "train.preference.method=dpo", "train.preference.beta=0.5",
        "train.num_workers=2",
        "train.epochs=2", "train.batch_size=4", "train.lr=2e-3", "train.warmup_ratio=0", "lora.r=8", "lora.dropout=0",
        "tracking.mlflow=false", "tracking.tensorboard=false", "train.adapter_name=dpo-pairs",
    ])  # fmt: skip
    preprocess(cfg.data, cfg.model, cfg.output_dir)
    cfg = check(cfg)
    res = run_training(cfg)
    assert res.metrics["eval_reward_accuracy"] >= 0.9 and res.metrics["eval_reward_margin"] > 0
    assert res.metrics["initial_eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res.registry_id and (Path(res.adapter_dir) / "adapter_config.json").is_file()
    assert (Path(cfg.output_dir) / "train" / "rewards.png").stat().st_size > 5000
    with pytest.raises(DataError, match="holds preference pairs, but data.preference=false"):
        check(cfg.model_copy(update={"data": cfg.data.model_copy(update={"preference": False}),
                                     "train": TrainConfig()}))  # fmt: skip


def test_a_preference_sweep_may_optimise_reward_accuracy_and_not_perplexity(tmp_path):
    from aigc.tune.search import check_sweep

    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {choice: [0.001, 0.003]}\n")
    pref = ("data.preference=true", "train.preference.method=dpo", f"tune.space={space}")
    check_sweep(_cfg(*pref, "tune.metric=eval_reward_accuracy", "tune.mode=max"))
    with pytest.raises(ConfigError, match="a train.preference.method=dpo run does not report 'eval_perplexity'"):
        check_sweep(_cfg(*pref, "tune.metric=eval_perplexity"))
    with pytest.raises(ConfigError, match="tune.metric: the trainer does not report 'eval_reward_accuracy'"):
        check_sweep(_cfg(f"tune.space={space}", "tune.metric=eval_reward_accuracy", "tune.mode=max"))


def test_the_rewards_plot_is_drawn_for_preference_runs_only(tmp_path):
    from aigc.train.outputs import plot_rewards

    history = [{"step": s, "eval_loss": 0.5, "eval_reward_accuracy": a, "eval_reward_margin": m}
               for s, a, m in [(4, 0.6, 0.2), (8, 0.9, 1.5)]]  # fmt: skip
    assert plot_rewards(history, str(tmp_path / "rewards.png")) is True
    assert (tmp_path / "rewards.png").stat().st_size > 5000
    assert plot_rewards([{"step": 4, "eval_loss": 1.0}], str(tmp_path / "sft.png")) is False
    assert not (tmp_path / "sft.png").exists()
