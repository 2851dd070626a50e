"""End to end: `aigc demo-preference` as a user runs it (slow tier): one preference round on the tiny model,
in a subprocess with its own embedded Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_preference_round_makes_the_dpo_version_preferred_on_held_out_pairs(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "aigc.cli", "demo-preference", "--config", "configs/demo.yaml", f"output_dir={out}",
           f"registry_dir={tmp_path / 'registry'}", "serve.port=8766"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": "", "AIGC_VERBOSE": ""}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    report = json.loads((tmp_path / "demo-preference" / "preference_report.json").read_text())
    assert report["ratings"]["good"] > 0 and report["ratings"]["bad"] > 0, report["ratings"]
    assert report["heldout_pairs"] >= 3
    sft, dpo = report["eval"]["models"][report["sft"]], report["eval"]["models"][report["dpo"]]
    assert (report["sft"], report["dpo"]) == ("support-bot-pref:v1", "support-bot-pref:v2")
    assert sft["reward_accuracy"] is None  # the reference: its implicit reward against itself is zero
    assert dpo["reward_accuracy"] > 0.5 and dpo["reward_margin"] > 0, dpo  # preferred on pairs it never saw
    assert dpo["win_rate"] > 0.5 and dpo["rouge_l"] > sft["rouge_l"], (sft, dpo)  # and better answers
    assert "5/5 aigc eval" in proc.stdout and f"reference model: {report['sft']}" in proc.stdout
