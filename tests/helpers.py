"""Tiny models for tests: a random 2-layer Llama, a byte-level BPE tokenizer and LoRA adapters for it.

Everything is built from code in a few seconds on a CPU; nothing is downloaded.

    base = make_tiny_model(tmp / "base")
    adapter = make_tiny_adapter(base, tmp / "adapter", seed=1)
    Registry(tmp / "registry").register("support", adapter, base_model=base)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from aigc.demo.tiny_base import SPECIAL_TOKENS

__all__ = ["SPECIAL_TOKENS", "free_port", "make_faulty_model", "make_tiny_adapter", "make_tiny_model"]


_CORPUS = [
    "The parcel left the warehouse on Monday and arrives in three days.",
    "Please send us your order number so we can check the refund.",
    "Our support team answers every message on the same working day.",
    "The coffee grinder is made of steel and comes in black or white.",
    "If the app crashes at checkout, update it and try again.",
    "Returns are free within thirty days when the item is unused.",
    "Hello! How can I help you today? Thank you for shopping with us.",
    "Your password reset link expires after one hour.",
]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in tests bind to loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Link:
    """A TCP forwarder to ``127.0.0.1:target`` that can be cut and restored (same port)."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Every open connection reset, new ones refused."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the server behind the link is down: this client's connection fails, others may not
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def tiny_tokenizer_with_template(tmp_path: Path, template: str | None) -> str:
    """The tiny tokenizer with ``template`` as its own chat template, or with none at all."""
    out = tmp_path / "tok"
    tiny = Path(__file__).resolve().parents[1] / "assets" / "tiny-base"
    shutil.copytree(tiny, out, ignore=shutil.ignore_patterns("*.safetensors", "chat_template.jinja"))
    if template is not None:
        from aigc.models.loading import load_tokenizer

        tok = load_tokenizer(str(out))
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"})
        tok.save_pretrained(out)
        (out / "chat_template.jinja").write_text(template)
    return str(out)


def make_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Write a random 2-layer Llama (hidden 64, 4 heads) and its tokenizer to ``out_dir``, built by the same
    code as the demo's tiny base model (:mod:`aigc.demo.tiny_base`), on a few sentences instead of a corpus.

    Returns:
        ``out_dir`` as a string; ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` open it.
    """
    from aigc.demo.tiny_base import make_model, train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(_CORPUS * 4, vocab_size=384)
    torch.manual_seed(seed)
    # Larger random weights than the default 0.02: greedy output varies with the prompt instead of repeating
    # one token, which makes streaming and stop strings meaningful to test.
    model = make_model(tokenizer, hidden=64, layers=2, heads=4, max_positions=512, init_std=0.3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def make_tiny_adapter(base_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 1, **lora: Any) -> str:
    """Write a LoRA adapter for the model in ``base_dir`` whose random weights change its outputs.

    peft initialises ``lora_B`` to zero (an adapter that does nothing); here every LoRA matrix gets seeded
    random values large enough to move the greedy argmax, so tests can tell adapter from base output.
    ``lora`` overrides ``LoraConfig`` fields (default: rank 4, alpha 8 on q_proj, v_proj and up_proj).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    fields = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"], **lora}
    cfg = LoraConfig(**fields, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(str(out_dir))
    return str(out_dir)


# Ray's Prometheus endpoint ---------------------------------------------------------------------------------
METRIC_SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")


def scrape_metrics() -> str:
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def metric_samples(text: str, name: str, **labels: str) -> list[float]:
    """``name``'s sample values whose labels include ``labels`` (one per worker that recorded it)."""
    out = []
    for line in text.splitlines():
        m = METRIC_SAMPLE.match(line)
        if m and m.group(1) == name and all(f'{k}="{v}"' in m.group(2) for k, v in labels.items()):
            out.append(float(m.group(3)))
    return out


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (counters: the total over workers)."""
    return sum(metric_samples(text, name, **labels))


def wait_for_metrics(check, timeout_s: float = 90) -> str:
    """Scrape until ``check(text)`` holds (Ray pushes worker metrics to the node's exporter every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = scrape_metrics()
        if check(text) or time.monotonic() > deadline:
            return text
        time.sleep(2)


def prepare_demo_data(tmp: Path, rows: int, seed: int, *extra: str) -> tuple[object, list[str]]:
    """``rows`` generated support examples preprocessed under ``tmp`` with the tiny model; returns the config and
    the overrides that describe it (the demo config plus ``extra``), for tests that train on the shared cluster."""
    import json

    from aigc.config import load_config
    from aigc.data.preprocess import preprocess
    from aigc.demo.dataset import generate_support_examples

    root = Path(__file__).resolve().parents[1]
    src = tmp / "support.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in generate_support_examples(rows, seed=seed)))
    overrides = [
        f"data.path={src}", f"model.name_or_path={root / 'assets' / 'tiny-base'}", f"output_dir={tmp / 'out'}",
        f"registry_dir={tmp / 'registry'}", "data.val_fraction=0.15", "data.tokenizer_actors=1", *extra,
    ]  # fmt: skip
    cfg = load_config(root / "configs" / "demo.yaml", overrides)
    preprocess(cfg.data, cfg.model, cfg.output_dir)
    return cfg, overrides


_FAULTY_MODELING = '''"""A Llama whose forward acts like a slow or hung device (loaded with trust_remote_code)."""

import time

from transformers import LlamaForCausalLM

DELAY_S = {delay_s!r}  # every forward pass takes at least this long: a slow device
WEDGE = {wedge!r}  # a prompt holding these token ids hangs its prefill forever: a hung device


class FaultyLlamaForCausalLM(LlamaForCausalLM):
    def forward(self, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[1] >= len(WEDGE):
            rows = input_ids.tolist()
            if any(row[i : i + len(WEDGE)] == WEDGE for row in rows for i in range(len(row))):
                while True:
                    time.sleep(1)
        time.sleep(DELAY_S)
        return super().forward(input_ids=input_ids, **kwargs)
'''


def make_faulty_model(out_dir: str | os.PathLike, delay_s: float = 0.01, wedge_text: str = " WEDGE WEDGE") -> str:
    """:func:`make_tiny_model` whose forward sleeps ``delay_s`` per pass and hangs on a prompt with ``wedge_text``.

    The behaviour lives in the model's own code (``auto_map`` + ``modeling_faulty.py``, as hub models ship
    custom code), so it runs inside a Serve replica unchanged; serve it with ``model.trust_remote_code: true``.
    Decoding passes (one token per row) never hang: only a prefill holding the wedge's token ids does.
    """
    import json

    from transformers import AutoTokenizer

    path = Path(make_tiny_model(out_dir))
    wedge = AutoTokenizer.from_pretrained(path).encode(wedge_text, add_special_tokens=False)
    (path / "modeling_faulty.py").write_text(_FAULTY_MODELING.format(delay_s=delay_s, wedge=wedge))
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_faulty.FaultyLlamaForCausalLM"}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(path)


def last_prompt_ids(row: dict) -> list[int]:
    """The ids before the last trained run of tokens in a tokenized row: the prompt of its last assistant turn."""
    labels = row["labels"]
    end = max(i for i, lab in enumerate(labels) if lab != -100)
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return row["input_ids"][:start]
