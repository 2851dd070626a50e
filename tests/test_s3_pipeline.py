"""The whole path on object storage, and a full fine-tune, on the shared local Ray cluster.

preprocess -> train -> register -> serve with ``output_dir`` and ``registry_dir`` on ``s3://`` (a local S3
server): what README's cluster section promises. Then ``train.method=full``: the whole model is published
to the registry and served as a base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import free_port

from aigc import storage
from aigc.config import load_config, with_values
from aigc.demo.dataset import generate_support_examples
from aigc.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Hi, the parcel for order #77 arrived damaged. What now?"


def _config(data: str, output_dir: str, registry_dir: str, *extra: str):
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"data.path={data}", f"output_dir={output_dir}", f"registry_dir={registry_dir}", "data.tokenizer_actors=1",
        "train.num_workers=1", "train.epochs=1", "train.batch_size=16", f"serve.port={free_port()}",
        "serve.autoscaling.max_replicas=1", *extra,
    ])  # fmt: skip


def _chat(base_url: str, model: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=0)
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
    )
    return r.choices[0].message.content or ""


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[str]:
    return [json.dumps(r) for r in generate_support_examples(160, seed=3)]


def test_preprocess_train_register_serve_on_s3(ray_cluster, s3_server, rows):
    from ray import serve

    from aigc.data.preprocess import preprocess
    from aigc.serve.run import run_server
    from aigc.train.trainer import run_training

    out, registry, data = s3_server("run"), s3_server("registry"), s3_server("raw") + "/support.jsonl"
    storage.write_text(data, "\n".join(rows) + "\n")
    cfg = _config(data, out, registry)
    assert cfg.output_dir == out and cfg.registry_dir == registry  # URIs are never made local paths

    pre = preprocess(cfg.data, cfg.model, cfg.output_dir)
    assert pre.stats["rows_kept"] == 160
    assert storage.list_files(storage.join(pre.shards_dir, "train"))[0].startswith(out + "/data/shards-")
    assert storage.is_file(storage.join(out, "data", "stats.json"))
    assert storage.is_file(storage.join(out, "data", "token_lengths.png"))

    res = run_training(cfg)
    assert res.adapter_dir == storage.join(out, "adapter") and res.registry_id == "support-bot:v1"
    assert storage.is_file(storage.join(out, "adapter", "adapter_model.safetensors"))
    assert storage.is_complete(res.adapter_dir)  # its completion marker was written last (aigc.storage.dirs)
    assert storage.is_file(storage.join(out, "train", "loss.png"))
    assert storage.list_files(storage.join(out, "ray", "support-bot"))  # Ray Train's checkpoints, on S3 too
    entry = Registry(registry).resolve("support-bot")
    assert entry.adapter_uri.startswith(registry + "/support-bot/v1/") and entry.kind == "lora"
    assert entry.metrics["eval_loss"] == res.metrics["eval_loss"] < res.metrics["initial_eval_loss"]

    serve.shutdown()
    try:
        url = run_server(cfg, blocking=False)
        tuned, base = _chat(url, "support-bot:v1"), _chat(url, "tiny-base")
    finally:
        serve.shutdown()
    assert tuned and tuned != base  # the adapter was fetched from S3 and changes the answer


def test_full_fine_tune_registers_and_serves(ray_cluster, rows, tmp_path):
    from ray import serve

    from aigc.data.preprocess import preprocess
    from aigc.serve.run import run_server
    from aigc.train.trainer import run_training

    data = tmp_path / "support.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cfg = _config(str(data), str(tmp_path / "out"), str(tmp_path / "registry"), "train.method=full",
                  "train.adapter_name=support-full", "train.lr=1e-3")  # fmt: skip
    preprocess(cfg.data, cfg.model, cfg.output_dir)
    res = run_training(cfg)
    entry = Registry(cfg.registry_dir).resolve(res.registry_id)
    assert entry.kind == "full" and (Path(entry.adapter_uri) / "model.safetensors").is_file()
    assert (Path(entry.adapter_uri) / "tokenizer.json").is_file()

    # A full fine-tune is a base model in its own right: serve it as one.
    served = with_values(cfg, {"model.name_or_path": entry.adapter_uri, "serve.base_model_id": entry.model_id})
    serve.shutdown()
    try:
        url = run_server(served, blocking=False)
        answer = _chat(url, "support-full:v1")
    finally:
        serve.shutdown()
    assert answer
