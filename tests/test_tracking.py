"""Experiment tracking (MLflow file store, TensorBoard events) and generation metrics, without a cluster."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
import torch

from aigc.config import TrackingConfig
from aigc.train.gen_metrics import GenSample, generation_metrics, generation_samples, rank_indices
from aigc.train.tracking import RUN_NAME_TAG, Tracker, flatten_params

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")
PARAMS = {"train": {"lr": 0.004, "epochs": 3, "adapter_name": "bot"}, "lora": {"r": 8}, "note": "x" * 7000}


def _client(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"file:{out / 'mlruns'}")


def _tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag from every event file under ``logdir`` (TFRecord framing, tensorboardX protos)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def test_flatten_params_dots_nested_keys_and_truncates_values():
    flat = flatten_params(PARAMS)
    assert flat["train.lr"] == "0.004" and flat["lora.r"] == "8"
    assert len(flat["note"]) == 6000


def test_tracker_writes_params_metrics_artifacts_and_tensorboard(tmp_path):
    artifact_dir = tmp_path / "adapter"
    artifact_dir.mkdir()
    (artifact_dir / "adapter_config.json").write_text("{}")
    (tmp_path / "loss.png").write_bytes(b"png")
    out = tmp_path / "out"

    tracker = Tracker.open(TrackingConfig(), str(out), "bot", PARAMS)
    for step, loss in [(1, 2.0), (2, 1.5), (3, 1.2)]:
        tracker.log_metrics({"train_loss": loss, "lr": torch.tensor(1e-3), "initial_eval_loss": None, "tag": "x"}, step)
    tracker.log_artifact(str(tmp_path / "loss.png"))
    tracker.log_artifact(str(artifact_dir), "adapter")
    tracker.close()

    client = _client(out)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "bot"
    assert run.data.tags[RUN_NAME_TAG] == "bot"
    assert client.get_experiment(run.info.experiment_id).name == "bot"  # train.adapter_name
    assert run.data.params["train.lr"] == "0.004" and len(run.data.params["note"]) == 6000
    history = client.get_metric_history(tracker.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5), (3, 1.2)]
    assert set(run.data.metrics) == {"train_loss", "lr"}  # None and text skipped
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"loss.png", "adapter"}
    assert [a.path for a in client.list_artifacts(tracker.run_id, "adapter")] == ["adapter/adapter_config.json"]

    scalars = _tensorboard_scalars(out / "tensorboard" / "bot")
    assert scalars["train_loss"] == [(1, 2.0), (2, 1.5), (3, pytest.approx(1.2))]
    assert set(scalars) == {"train_loss", "lr"}


def test_disabled_tracker_writes_nothing(tmp_path):
    for tracker in (Tracker.disabled(), Tracker.open(TrackingConfig(mlflow=False, tensorboard=False), str(tmp_path),
                                                     "bot", PARAMS)):  # fmt: skip
        tracker.log_metrics({"train_loss": 1.0}, 1)
        tracker.log_artifact(str(tmp_path / "missing"))
        tracker.close()
        assert tracker.run_id is None
    assert list(tmp_path.iterdir()) == []


def test_experiment_and_tensorboard_only(tmp_path):
    cfg = TrackingConfig(mlflow=False, experiment="ignored")
    tracker = Tracker.open(cfg, str(tmp_path), "bot", PARAMS)
    tracker.log_metrics({"eval_loss": 3.0}, 5)
    tracker.close()
    assert tracker.run_id is None and not (tmp_path / "mlruns").exists()
    assert _tensorboard_scalars(tmp_path / "tensorboard" / "bot") == {"eval_loss": [(5, 3.0)]}

    tracker = Tracker.open(TrackingConfig(tensorboard=False, experiment="exp"), str(tmp_path), "bot", PARAMS)
    tracker.close()
    assert _client(tmp_path).get_experiment_by_name("exp") is not None


def test_resume_continues_the_same_run_and_a_fresh_start_does_not(tmp_path):
    cfg = TrackingConfig(tensorboard=False)
    first = Tracker.open(cfg, str(tmp_path), "bot", PARAMS)
    first.log_metrics({"train_loss": 2.0}, 1)
    first.close("FAILED")

    resumed = Tracker.open(cfg, str(tmp_path), "bot", {**PARAMS, "extra": 1}, resume=True)
    assert resumed.run_id == first.run_id
    assert _client(tmp_path).get_run(resumed.run_id).info.status == "RUNNING"
    resumed.log_metrics({"train_loss": 1.0}, 2)
    resumed.close()

    client = _client(tmp_path)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["extra"] == "1"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")] == [(1, 2.0), (2, 1.0)]

    other = Tracker.open(cfg, str(tmp_path), "bot-2", PARAMS, resume=True)  # no run of that name yet
    fresh = Tracker.open(cfg, str(tmp_path), "bot", PARAMS, parent_run_id=first.run_id)
    assert len({first.run_id, other.run_id, fresh.run_id}) == 3
    assert client.get_run(fresh.run_id).data.tags["mlflow.parentRunId"] == first.run_id
    other.close("KILLED")
    fresh.close()


def test_uri_output_dir_is_uploaded_at_close_and_found_on_resume(s3_server, tmp_path, monkeypatch):
    from aigc import storage

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "local"))  # the local mirror goes here
    out = s3_server("tracked")
    first = Tracker.open(TrackingConfig(), out, "bot", PARAMS)
    first.log_metrics({"train_loss": 2.0}, 1)
    first.close("FAILED")
    uploaded = storage.list_files(out)
    assert any(f"{first.run_id}/metrics/train_loss" in f for f in uploaded)
    assert any("/tensorboard/bot/events.out.tfevents." in f for f in uploaded)

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "other-node"))  # a restart elsewhere: empty mirror
    resumed = Tracker.open(TrackingConfig(tensorboard=False), out, "bot", PARAMS, resume=True)
    assert resumed.run_id == first.run_id
    resumed.close()


def test_close_is_idempotent_and_names_bad_statuses(tmp_path):
    tracker = Tracker.open(TrackingConfig(tensorboard=False), str(tmp_path), "bot", PARAMS)
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tracker.close("DONE")
    tracker.close("KILLED")
    tracker.close()  # no effect: the first status stays
    tracker.log_metrics({"train_loss": 1.0}, 9)
    client = _client(tmp_path)
    assert client.get_run(tracker.run_id).info.status == "KILLED"
    assert client.get_metric_history(tracker.run_id, "train_loss") == []


def test_generation_samples_take_the_last_answer_and_split_packed_rows():
    rows = {
        "input_ids": [[5, 6, 7, 8, 9], [1, 2, 3, 4], [10, 11, 12, 13, 14, 15]],
        "labels": [[-100, -100, 7, -100, 9], [-100, 2, 3, 4], [-100, -100, 12, -100, -100, 15]],
        "position_ids": [[0, 1, 2, 3, 4], [0, 1, 2, 3], [0, 1, 2, 0, 1, 2]],
    }
    samples = generation_samples(rows, 10)  # row 2 is a document (no prompt); row 3 holds two examples
    assert samples == [GenSample([5, 6, 7, 8], [9]), GenSample([10, 11], [12]), GenSample([13, 14], [15])]
    assert generation_samples(rows, 2) == samples[:2]
    no_packing = {"input_ids": rows["input_ids"][:1], "labels": rows["labels"][:1]}
    assert generation_samples(no_packing, 5) == samples[:1]


@pytest.mark.parametrize(("n", "world_size"), [(0, 2), (1, 2), (5, 2), (7, 3), (4, 4), (3, 1)])
def test_ranks_split_samples_evenly_and_cover_each_once(n, world_size):
    shares = [rank_indices(n, r, world_size) for r in range(world_size)]
    assert len({len(s) for s in shares}) == 1  # same forward-pass count on every rank
    covered = sorted(i for s in shares for i in s if i is not None)
    assert covered == list(range(n))


@pytest.fixture(scope="module")
def tiny():
    from aigc.models.loading import load_base_model, load_tokenizer

    tok = load_tokenizer(TINY)
    model = load_base_model(TINY, "float32", "cpu", False)
    questions = ["How do I reset my password?", "Where is my order?", "My parcel arrived damaged, what now?"]
    prompts = [
        list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)[
            "input_ids"])
        for q in questions
    ]  # fmt: skip
    # What greedy decoding produces, one prompt at a time through transformers' own generate (no padding).
    greedy = [
        model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p) :].tolist() for p in prompts
    ]
    return model, tok, prompts, greedy


def test_generation_metrics_score_greedy_answers(tiny):
    model, tok, prompts, greedy = tiny
    assert len({len(p) for p in prompts}) > 1  # the batch needs left padding
    model.train()
    exact = [GenSample(p, g) for p, g in zip(prompts, greedy, strict=True)]
    kw = {"max_new_tokens": 12, "device": "cpu", "rank": 0, "world_size": 1}
    assert generation_metrics(model, exact, tok, **kw) == {"eval_exact_match": 1.0, "eval_rouge_l": 1.0}
    assert model.training  # mode restored

    wrong = [GenSample(p, tok.encode("completely unrelated words here", add_special_tokens=False)) for p in prompts]
    scores = generation_metrics(model, wrong, tok, **kw)
    assert scores["eval_exact_match"] == 0.0 and scores["eval_rouge_l"] < 0.5

    mixed = generation_metrics(model, [*exact[:2], wrong[2]], tok, **kw, batch_size=2)
    assert mixed["eval_exact_match"] == pytest.approx(2 / 3)


def test_greedy_decoding_stops_once_every_answer_has_ended(tiny):
    from aigc.train.gen_metrics import _greedy

    model, tok, prompts, greedy = tiny
    model.eval()
    cpu = torch.device("cpu")
    full = _greedy(model, prompts, 12, tok.pad_token_id, cpu, contextlib.nullcontext)  # no end tokens: 12 steps
    assert [len(a) for a in full] == [12] * 3
    assert all(a[: len(g)] == g for a, g in zip(full, greedy, strict=True))  # generate() stops at its EOS
    ends = {a[1] for a in full}  # as if these were end tokens: every answer has one by its second token
    short = _greedy(model, prompts, 12, tok.pad_token_id, cpu, contextlib.nullcontext, eos=ends)
    last = max(min(i for i, t in enumerate(a) if t in ends) for a in full)  # where the last answer ends
    assert last <= 1 and [len(a) for a in short] == [last + 1] * 3
    assert all(a == f[: last + 1] for a, f in zip(short, full, strict=True))


def test_generation_metrics_split_across_two_ranks(tiny):
    model, tok, prompts, greedy = tiny
    tok_wrong = tok.encode("completely unrelated words here", add_special_tokens=False)
    samples = [GenSample(prompts[0], greedy[0]), GenSample(prompts[1], greedy[1]), GenSample(prompts[2], tok_wrong)]
    kw = {"max_new_tokens": 12, "device": "cpu", "world_size": 2}
    # rank 0 answers samples 0 and 2, rank 1 sample 1 (and a padding entry it does not score)
    assert generation_metrics(model, samples, tok, rank=0, **kw)["eval_exact_match"] == 0.5
    assert generation_metrics(model, samples, tok, rank=1, **kw)["eval_exact_match"] == 1.0
