"""Preference losses (aigc.train.preference) against TRL's own trainers on the same batch and the same tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from aigc.models.loading import apply_lora, load_base_model, load_tokenizer
from aigc.train.preference import (
    PreferenceLoss,
    adapters_disabled,
    dpo_loss,
    orpo_loss,
    pair_metric_sums,
    pair_metrics,
    preference_loss,
)

TINY = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-base")
PAIRS = [
    {"prompt": "Where is my order 4821?", "chosen": " It left the warehouse today.", "rejected": " No."},
    {"prompt": "Can I return the lamp?", "chosen": " Yes, within thirty days.", "rejected": " Maybe later, ask again."},
    {"prompt": "Hello", "chosen": " Hi! How can I help?", "rejected": " Goodbye."},
]  # fmt: skip
TOL = dict(rtol=1e-5, atol=1e-5)


def _perturb_lora(model, seed: int = 0) -> None:
    """A fresh LoRA adapter equals its base (B = 0), so policy and reference would agree: move B away from 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TRL's collated batch in this platform's shape: labels are the input ids where the completion mask is 1."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def _dpo_trainer(tmp_path, loss_type: str, beta: float):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    tok = load_tokenizer(TINY)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to=[], use_cpu=True,
        per_device_train_batch_size=len(PAIRS), max_length=None, dataset_num_proc=None, seed=0,
    )  # fmt: skip
    peft_cfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    trainer = DPOTrainer(
        model=load_base_model(TINY, dtype="float32"), args=args, train_dataset=Dataset.from_list(PAIRS),
        processing_class=tok, peft_config=peft_cfg,
    )  # fmt: skip
    _perturb_lora(trainer.model)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    return trainer, batch


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_and_metrics_equal_trl_dpo_trainer(tmp_path, loss_type):
    beta = 0.3
    trainer, batch = _dpo_trainer(tmp_path, loss_type, beta)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    out = preference_loss(trainer.model, _labels(batch), PreferenceLoss("dpo", beta=beta, loss_type=loss_type))

    torch.testing.assert_close(out.loss, trl_loss.detach(), **TOL)
    assert out.loss.requires_grad  # the policy's forward keeps its graph; the reference's has none
    ours = pair_metrics(pair_metric_sums(out))
    for mine, theirs in [
        ("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
        ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
        ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected"),
    ]:  # fmt: skip
        assert ours[mine] == pytest.approx(trl_metrics[theirs], rel=1e-5, abs=1e-5), mine
    # the batch is not degenerate: policy and reference differ, and the loss is not the untrained log(2)
    assert ours["rewards_chosen"] != pytest.approx(0.0, abs=1e-3)
    if loss_type == "sigmoid":
        assert out.loss.item() != pytest.approx(math.log(2), abs=1e-3)


def test_dpo_reference_is_the_base_model_with_adapters_disabled(tmp_path):
    trainer, batch = _dpo_trainer(tmp_path, "sigmoid", 0.1)
    base = load_base_model(TINY, dtype="float32")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), adapters_disabled(trainer.model):
        disabled = trainer.model(**inputs, use_cache=False).logits
        torch.testing.assert_close(disabled, base(**inputs, use_cache=False).logits)
    with torch.no_grad():
        enabled = trainer.model(**inputs, use_cache=False).logits
    assert not torch.allclose(enabled, disabled, atol=1e-3)  # the adapters are back on after the block


def test_dpo_without_adapters_needs_a_reference_model():
    model = load_base_model(TINY, dtype="float32")
    with (
        pytest.raises(ValueError, match="DPO needs a reference model: with LoRA it is the base with adapters disabled"),
        adapters_disabled(model),
    ):
        pass


def _orpo_batch(tok, prompt_len: int | None) -> dict[str, torch.Tensor]:
    """Chosen/rejected rows as TRL's ORPO trainer takes them (``chosen_input_ids`` ...), right-padded."""
    rows = {"chosen": [], "rejected": []}
    for pair in PAIRS:
        prompt = tok(pair["prompt"], add_special_tokens=False)["input_ids"]
        prompt = prompt[:prompt_len] if prompt_len else prompt
        for side in rows:
            answer = tok(pair[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows[side].append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for side in rows.values() for ids, _ in side)
    batch = {}
    for side, items in rows.items():
        ids = torch.full((len(items), width), tok.pad_token_id)
        labels = torch.full((len(items), width), -100)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (x, y) in enumerate(items):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    return batch


def _ours(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "attention_mask", "labels")
    }


def _orpo_trainer(tmp_path, beta: float):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = load_tokenizer(TINY)
    model = apply_lora(load_base_model(TINY, dtype="float32"), 4, 8, 0.0, ["q_proj", "v_proj"])
    _perturb_lora(model)
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to=[], use_cpu=True, seed=0)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tok)
    trainer.model.train()
    return trainer, tok


def test_orpo_loss_equals_trl_orpo_trainer_on_a_one_token_prompt(tmp_path):
    """With a one-token prompt, no prompt token is ever predicted, so TRL's NLL (prompt and answer) and ours (answer
    tokens only) count the same tokens: the whole loss must agree."""
    beta = 0.25
    trainer, tok = _orpo_trainer(tmp_path, beta)
    batch = _orpo_batch(tok, prompt_len=1)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    out = preference_loss(trainer.model, _ours(batch), PreferenceLoss("orpo", beta=beta))
    torch.testing.assert_close(out.loss, trl_loss.detach(), **TOL)
    assert out.nll.item() == pytest.approx(trl_metrics["nll_loss"], rel=1e-5)
    ours = pair_metrics(pair_metric_sums(out))
    for mine, theirs in [
        ("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
        ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
        ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected"),
    ]:  # fmt: skip
        assert ours[mine] == pytest.approx(trl_metrics[theirs], rel=1e-5, abs=1e-6), mine


def test_orpo_odds_ratio_term_equals_trl_and_nll_counts_answer_tokens_only(tmp_path):
    beta = 0.25
    trainer, tok = _orpo_trainer(tmp_path, beta)
    batch = _orpo_batch(tok, prompt_len=None)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    out = preference_loss(trainer.model, _ours(batch), PreferenceLoss("orpo", beta=beta))
    # the odds-ratio term is TRL's: loss - nll agrees
    assert (out.loss - out.nll).item() == pytest.approx(trl_loss.item() - trl_metrics["nll_loss"], rel=1e-5)
    # the NLL is the mean over chosen answer tokens alone (TRL's also counts the prompt's): recompute it by hand
    inputs = _ours(batch)
    with torch.no_grad():
        logits = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    n = len(PAIRS)
    expected = torch.nn.functional.cross_entropy(logits[:n, :-1].transpose(1, 2), inputs["labels"][:n, 1:])
    assert out.nll.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.nll.item() != pytest.approx(trl_metrics["nll_loss"], rel=1e-3)


def test_dpo_loss_values_by_hand():
    # log-ratios: chosen (−1) − (−2) = 1, rejected (−3) − (−1) = −2, so delta = 3
    c, r = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.0]), torch.tensor([-1.0])
    out = dpo_loss(c, r, rc, rr, beta=0.5)
    assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))))
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (0.5, -1.0)
    assert dpo_loss(c, r, rc, rr, beta=0.5, loss_type="hinge").loss.item() == 0.0  # 1 - 1.5 < 0
    ipo = dpo_loss(c, r, rc, rr, 0.5, "ipo", torch.tensor([2]), torch.tensor([4]))
    assert ipo.loss.item() == pytest.approx((1 / 2 - (-2) / 4 - 1) ** 2)
    with pytest.raises(ValueError, match="loss_type 'ipo' needs the answer token counts"):
        dpo_loss(c, r, rc, rr, 0.5, "ipo")
    with pytest.raises(ValueError, match="DPO loss_type must be one of sigmoid, hinge, ipo; got 'kto'"):
        dpo_loss(c, r, rc, rr, 0.5, "kto")


def test_orpo_loss_value_by_hand():
    # mean log-probs: chosen log(0.5), rejected log(0.25): odds 1 and 1/3, log odds ratio = log 3
    out = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), torch.tensor(2.0), beta=0.1)
    assert out.loss.item() == pytest.approx(2.0 - 0.1 * math.log(3 / 4), rel=1e-6)


def test_pair_metrics_are_exact_means_over_batches():
    a = dpo_loss(torch.tensor([0.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.zeros(2), torch.zeros(2), beta=1.0)
    b = dpo_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1), beta=1.0)
    sums = {k: pair_metric_sums(a)[k] + pair_metric_sums(b)[k] for k in pair_metric_sums(a)}
    m = pair_metrics(sums, prefix="eval_")
    assert m["eval_reward_accuracy"] == pytest.approx(2 / 3)  # pairs 1 and 3 right, pair 2 wrong
    assert m["eval_reward_margin"] == pytest.approx((1 - 1 + 2) / 3)
    assert m["eval_logps_chosen"] == pytest.approx(2 / 3)
    assert "eval_pairs" not in m


def test_preference_loss_spec_is_validated():
    with pytest.raises(ValueError, match="beta must be > 0, got 0"):
        PreferenceLoss("dpo", beta=0)
    with pytest.raises(ValueError, match="preference method must be 'dpo' or 'orpo', got 'kto'"):
        PreferenceLoss("kto")
