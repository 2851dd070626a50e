"""Learning-rate schedules, weight-decay groups and the progress line (no Ray)."""

from __future__ import annotations

import pytest
import torch

from aigc.config import load_config
from aigc.train.optim import (
    build_optimizer,
    build_scheduler,
    param_groups,
    reapply_hyperparams,
    run_hyperparams,
    warmup_steps,
)
from aigc.train.progress import StepProgress, format_duration


def _lrs(schedule: str, total: int = 10, **train) -> list[float]:
    tc = load_config(overrides=[f"train.lr_scheduler={schedule}", "train.lr=1.0", "train.warmup_steps=2"]).train
    tc = tc.model_copy(update=train)
    opt = build_optimizer(torch.nn.Linear(2, 2), tc)
    sched = build_scheduler(opt, tc, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_warm_up_then_follow_their_shape():
    const, lin, cos = _lrs("constant"), _lrs("linear"), _lrs("cosine")
    for lrs in (const, lin, cos):
        assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])  # linear warmup over 2 steps
    assert const[2:] == pytest.approx([1.0] * 8)
    assert lin[2:] == pytest.approx([1 - i / 8 for i in range(8)])
    assert cos[6] == pytest.approx(0.5)  # half-way through the decay
    assert all(a > b for a, b in zip(cos[2:], cos[3:], strict=False))


def test_loaded_state_keeps_its_position_but_takes_this_runs_lr_and_weight_decay():
    """What a PBT trial does with a donor's checkpoint: the schedule continues, scaled to the mutated peak lr."""

    def run(lr: float, wd: float) -> tuple:
        tc = load_config(overrides=["train.lr_scheduler=cosine", f"train.lr={lr}", "train.warmup_steps=2",
                                    f"train.weight_decay={wd}"]).train  # fmt: skip
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        opt = build_optimizer(model, tc)
        return opt, build_scheduler(opt, tc, 10)

    donor_opt, donor_sched = run(1.0, 0.0)
    for _ in range(4):
        donor_opt.step()
        donor_sched.step()
    opt, sched = run(2.0, 0.1)
    hyper = run_hyperparams(opt)
    opt.load_state_dict(donor_opt.state_dict())
    sched.load_state_dict(donor_sched.state_dict())
    assert sched.get_last_lr()[0] == pytest.approx(donor_sched.get_last_lr()[0])  # the donor's lr, until:
    reapply_hyperparams(opt, sched, hyper)
    assert sched.last_epoch == 4
    assert sched.get_last_lr() == pytest.approx([2 * donor_sched.get_last_lr()[0]] * 2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(sched.get_last_lr())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    for _ in range(3):
        donor_opt.step(), donor_sched.step(), opt.step(), sched.step()
        assert sched.get_last_lr()[0] == pytest.approx(2 * donor_sched.get_last_lr()[0])


def test_warmup_ratio_applies_unless_steps_are_given():
    tc = load_config(overrides=["train.warmup_ratio=0.1"]).train
    assert warmup_steps(tc, 200) == 20
    assert warmup_steps(tc.model_copy(update={"warmup_steps": 3}), 200) == 3


def test_weight_decay_skips_biases_and_norm_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # 2 biases, norm weight and bias


def test_progress_line_every_n_steps(capsys):
    p = StepProgress(total_steps=4, epochs=2, every=2, start_step=0, enabled=True)
    for step in range(1, 5):
        p.step(step, epoch=(step - 1) // 2, loss=1.0 / step, lr=1e-4, tokens=100)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[train] step 2/4 (epoch 1/2)  loss 0.5000  lr 1.0e-04") and "ETA" in lines[0]
    assert lines[1].startswith("[train] step 4/4 (epoch 2/2)") and lines[1].endswith("ETA 0s")
    assert format_duration(75) == "1m15s" and format_duration(3725) == "1h02m"
