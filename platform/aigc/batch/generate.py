"""``aigc generate``: the serving engine over a dataset, on a Ray Data actor pool, resumable.

    aigc generate --config configs/demo.yaml generate.input=assets/demo-data/support.jsonl generate.model=support-bot

1. the input's records are read and numbered on the driver (:mod:`aigc.batch.inputs`); the model reference is
   resolved once to one registry version (:mod:`aigc.batch.models`);
2. rows already in published parts are skipped (:mod:`aigc.batch.parts`): a killed run resumes where it was;
3. the others go through ``map_batches`` on a pool of ``generate.actors`` actors (``ActorPoolStrategy``), each
   holding one engine (:mod:`aigc.batch.worker`); each batch of ``generate.batch_size`` rows is decoded together and
   published as one part; the driver prints progress and throughput as parts come back;
4. the parts are merged into ``generations.<format>``, ``quarantine.jsonl`` and ``summary.json``.

Costs: each actor holds the base model (and the adapter) in memory and runs two parts at once on its engine (up
to twice ``batch_size`` rows per decoding step); rows of a part wait for the part's slowest answer before they
are written, so a larger ``batch_size`` loses more to a kill.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

from aigc import storage
from aigc.batch.inputs import detect_format, read_rows
from aigc.batch.models import ModelChoice, resolve_model_ref
from aigc.batch.parts import check_run, done_rows, merge_parts
from aigc.batch.worker import EngineSettings, GenerateActor
from aigc.config import PlatformConfig
from aigc.console import StageLine
from aigc.errors import ServiceUnavailableError

__all__ = ["GenerateResult", "generate_output", "run_generate", "settings_for"]

_PARTS_PER_ACTOR = 2


@dataclass(frozen=True)
class GenerateResult:
    """What a run wrote: where, how many rows answered and quarantined, and how fast this run went."""

    output: str
    path: str  # generations.<format>
    rows: int
    answered: int
    quarantined: int
    skipped: int  # rows found already published (a resumed run)
    completion_tokens: int
    seconds: float
    model: str
    model_version: str


def generate_output(cfg: PlatformConfig) -> str:
    """``generate.output``, or ``<output_dir>/generate``."""
    return cfg.generate.output or storage.join(cfg.output_dir, "generate")


def settings_for(cfg: PlatformConfig, choice: ModelChoice, fmt: str, output: str) -> EngineSettings:
    """The actors' settings for ``choice`` writing to ``output``."""
    g = cfg.generate
    return EngineSettings(
        base_model=cfg.model.load_path(), dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
        adapter_uri=choice.adapter_uri, label=choice.label, version=choice.version, fmt=fmt,
        prompt_column=g.prompt_column, system_prompt=cfg.data.system_prompt, max_tokens=g.max_tokens,
        temperature=g.temperature, top_p=g.top_p, seed=g.seed, max_batch_size=g.batch_size * _PARTS_PER_ACTOR,
        output=output,
    )  # fmt: skip


def _run_record(s: EngineSettings, cfg: PlatformConfig, rows: int) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    keep = ("base_model", "version", "fmt", "prompt_column", "system_prompt", "max_tokens", "temperature", "top_p",
            "seed")  # fmt: skip
    return {**{k: v for k, v in asdict(s).items() if k in keep}, "input": cfg.generate.input, "rows": rows}


def run_generate(
    cfg: PlatformConfig, model: str | None = None, output: str | None = None, line: StageLine | None = None
) -> GenerateResult:
    """Generate an answer for every row of ``generate.input`` with ``model`` (default ``generate.model``).

    Joins the running Ray cluster (or starts a local one when none is running).

    Args:
        output: the run's directory (default :func:`generate_output`).
        line: the progress line to report on (default: a new ``[generate]`` line).

    Raises:
        ConfigError: no input, an unknown model, or an output holding a run with other settings.
    """
    import ray

    g = cfg.generate
    output = output or generate_output(cfg)
    # 1. rows and model, on the driver
    raws = read_rows(g.input or "", g.limit)
    fmt = detect_format(raws, g.format, g.prompt_column)
    choice = resolve_model_ref(cfg, model or g.model)
    settings = settings_for(cfg, choice, fmt, output)
    check_run(output, _run_record(settings, cfg, len(raws)))
    # 2. what earlier runs published
    done = done_rows(output)
    pending = [{"index": i, "raw": r} for i, r in enumerate(raws) if i not in done]
    own = line or StageLine("generate", total=len(raws))
    started, tokens = time.monotonic(), 0
    with own if line is None else contextlib.nullcontext():
        own.log(f"{choice.label} ({choice.version}): {len(raws)} rows, {len(done)} already done, "
                f"{len(pending)} to generate on {g.actors} actor(s)")  # fmt: skip
        # 3. the actor pool
        if pending:
            if not ray.is_initialized():
                ray.init()
            results = ray.data.from_items(pending).map_batches(
                GenerateActor, fn_constructor_args=(settings,), batch_size=g.batch_size, batch_format="numpy",
                # Two parts at once per actor (two threads, one engine): the next part's rows join the running batch
                # while the last answers of the previous one finish, so the engine never idles at a part's tail.
                compute=ray.data.ActorPoolStrategy(size=g.actors, max_concurrent_calls_per_actor=_PARTS_PER_ACTOR,
                                                   enable_true_multi_threading=True),
                num_cpus=g.cpus_per_actor, num_gpus=g.gpus_per_actor or None,
            )  # fmt: skip
            try:
                parts = list(_parts(results, own, len(done), len(raws), started))
            except Exception as exc:  # an actor that could not start, or an engine that stopped generating
                raise ServiceUnavailableError(
                    f"aigc generate stopped: {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}; "
                    f"the {len(done_rows(output)) - len(done)} rows published by this run are kept: run it again "
                    "to resume",
                    code="batch_interrupted",
                ) from exc
            tokens = sum(p[2] for p in parts)
        # 4. the merged result
        ok, bad = merge_parts(output, g.output_format)
        seconds = time.monotonic() - started
        result = GenerateResult(output, storage.join(output, f"generations.{g.output_format}"), len(raws), len(ok),
                                len(bad), len(done), tokens, seconds, choice.label, choice.version)  # fmt: skip
        storage.write_json(storage.join(output, "summary.json"), asdict(result))
        own.log(f"{len(ok)} answered, {len(bad)} quarantined -> {result.path} ({seconds:.1f}s, "
                f"{tokens / max(seconds, 1e-9):.0f} tokens/s this run)")  # fmt: skip
    return result


def _parts(results: Any, line: StageLine, done: int, total: int, started: float) -> Any:
    """(answered, quarantined, completion tokens) of each part as the actors publish it, with a progress line."""
    answered = errors = tokens = 0
    for part in results.iter_rows():
        ok, bad, new = int(part["rows"]) - int(part["errors"]), int(part["errors"]), int(part["completion_tokens"])
        answered, errors, tokens = answered + ok, errors + bad, tokens + new
        elapsed = max(time.monotonic() - started, 1e-9)
        line.update(done=done + answered + errors, total=total,
                    text=f"{(answered + errors) / elapsed:.1f} rows/s, {tokens / elapsed:.0f} tokens/s, "
                    f"{errors} quarantined")  # fmt: skip
        yield ok, bad, new
