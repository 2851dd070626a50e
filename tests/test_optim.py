"""Learning-rate schedules, weight-decay groups and the progress line (no Ray)."""

from __future__ import annotations

import pytest
import torch

from aigc.config import load_config
from aigc.train.optim import build_optimizer, build_scheduler, param_groups, warmup_steps
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
