"""Sampling a process tree while a benchmark runs it: peak memory, and CPU seconds by process.

Ray names its worker processes after what they run (``ray::RayTrainWorker``, ``ray::MapWorker(...)``), so CPU
seconds by process title show what runs on the cores besides the work itself: the driver, Ray's controllers and
coordinators, the dashboard, the raylet.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

__all__ = ["TreeSampler"]


class TreeSampler:
    """Samples ``pid`` and its descendants every ``interval`` s in a thread, from ``start()`` until ``stop()``:
    ``peak`` holds the peak RSS of ``pid`` itself and the peak sums of RSS and, with ``pss_interval``, PSS
    (shared pages counted in every process / split between them); :meth:`cpu_by_title` each process title's CPU
    seconds (user + system, the last value seen per process: a process that exits between samples keeps its
    last value; a title is ``comm``, cut at 15 characters, when the command line cannot be read).

    The sampler runs on the cores it measures. PSS reads every process's ``smaps``: ~90 ms of CPU per sample
    over an embedded Ray cluster's ~20 processes on 2 cores (RSS and CPU times: ~8 ms), so sampling it every
    0.3 s took ~30% of a core from the measured run, and only from the runs with many processes. It is read
    every ``pss_interval`` s when asked for (the peak of a plateau, not of a spike), never by default.
    """

    def __init__(self, pid: int, interval: float = 0.5, pss_interval: float | None = None):
        self.pid, self.interval, self.pss_interval = pid, interval, pss_interval
        self.peak: dict[str, int] = {"rss": 0, "pss": 0, "root_rss": 0}
        self._cpu: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_by_title(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, secs in self._cpu.values():
            out[name] = out.get(name, 0.0) + secs
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    def _loop(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        last_pss = float("-inf")
        while not self._stop.is_set():
            rss = pss = 0
            now = time.monotonic()
            full = self.pss_interval is not None and now - last_pss >= self.pss_interval
            last_pss = now if full else last_pss
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    mem = p.memory_full_info() if full else p.memory_info()
                    rss, pss = rss + mem.rss, pss + (getattr(mem, "pss", mem.rss) if full else 0)
                    if p.pid == self.pid:
                        self.peak["root_rss"] = max(self.peak["root_rss"], mem.rss)
                    t = p.cpu_times()
                    self._cpu[p.pid] = (title(p), t.user + t.system)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak["rss"], self.peak["pss"] = max(self.peak["rss"], rss), max(self.peak["pss"], pss)
            self._stop.wait(self.interval)


def title(p: Any) -> str:
    """A short name for a process: Ray's title up to the first space, dot or parenthesis (``ray::RayTrainWorker``,
    ``ray::MapWorker``, ``raylet``); a Python process by its script or module."""
    try:
        words = p.cmdline()
    except Exception:
        words = []
    name = words[0] if words else p.name()
    if name.startswith("ray::"):
        return name.split()[0].split(".")[0].split("(")[0]
    base = os.path.basename(name)
    if base.startswith("python") and len(words) > 1:
        script = words[2] if words[1] == "-m" and len(words) > 2 else os.path.basename(words[1])
        return f"python {script}"
    return base
