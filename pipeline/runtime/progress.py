"""What a run counts while its rows stream: the progress line or bar (:class:`Progress`) and each
shard's tally for its done marker (:class:`ShardTally`: images, failures per stage, busy seconds of
each timed stage). The timed stages come from the stage classes (``timed``)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stages import plan as stage_plan


def timed_stages() -> tuple[str, ...]:
    """The stages that time their rows (``<stage>_ms``; the stage class says ``timed``), in plan
    order (:data:`pipeline.stages.plan.STAGE_ORDER`); run.json has ``<stage>_busy`` for each."""
    return tuple(cls.name for cls in stage_plan.STAGE_ORDER if getattr(cls, "timed", False))


class Progress:
    """Progress of the run's images: done / total, images/s, failed and the time left (ETA).

    On a terminal (``stream`` is a TTY) one line is redrawn in place with a bar, at most every
    ``bar_interval`` seconds; otherwise (a log file, a pipe, Ray Jobs) a plain line goes to ``log``
    at most every ``interval`` seconds. ``stream=None`` and a ``log`` that drops lines make it quiet."""

    WIDTH = 24

    def __init__(self, total: int, log: Callable[[str], None], interval: float = 2.0, stream: Any = None,
                 bar_interval: float = 0.2) -> None:
        self.total, self.log = total, log
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.stream = stream
        self.interval = bar_interval if self.tty else interval
        self.done = self.failed = 0
        self.t0 = self._last = time.monotonic()

    def text(self, now: float) -> str:
        rate = self.done / max(now - self.t0, 1e-9)
        pct = 100.0 * self.done / max(self.total, 1)
        left = (self.total - self.done) / rate if rate > 0 else None
        eta = "?" if left is None else str(dt.timedelta(seconds=round(left)))
        return f"{self.done}/{self.total} images ({pct:.0f}%), {rate:.1f} images/s, {self.failed} failed, ETA {eta}"

    def update(self, n: int, failed: int) -> None:
        self.done += n
        self.failed += failed
        now = time.monotonic()
        if now - self._last < self.interval and self.done < self.total:
            return
        self._last = now
        if self.tty:
            filled = int(self.WIDTH * self.done / max(self.total, 1))
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            end = "\n" if self.done >= self.total else ""
            self.stream.write(f"\r[{bar}] {self.text(now)}\x1b[K{end}")
            self.stream.flush()
        else:
            self.log(f"progress: {self.text(now)}")


class ShardTally:
    """What a shard's done marker says: images, failed (total and per stage), busy seconds per stage;
    added up batch by batch as the shard's rows stream through."""

    def __init__(self) -> None:
        self.images = self.failed = self.refined = 0
        self.busy = {s: 0.0 for s in timed_stages()}
        self.failed_by_stage: dict[str, int] = {}

    def add(self, rows: pa.Table) -> None:
        self.images += rows.num_rows
        for status, stage in zip(rows.column("status").to_pylist(), rows.column("error_stage").to_pylist()):
            if status != "ok":
                self.failed += 1
                self.failed_by_stage[str(stage)] = self.failed_by_stage.get(str(stage), 0) + 1
        if "refined" in rows.column_names:
            self.refined += int(pc.sum(rows.column("refined").cast(pa.int64())).as_py() or 0)
        for s in self.busy:
            if f"{s}_ms" in rows.column_names:
                self.busy[s] += float(pc.sum(rows.column(f"{s}_ms")).as_py() or 0.0) / 1000.0

    def marker(self) -> dict[str, Any]:
        return {"images": self.images, "failed": self.failed, "busy": self.busy,
                "failed_by_stage": self.failed_by_stage,
                "refined": self.refined}


def busy_seconds(markers: dict[Any, dict[str, Any]]) -> dict[str, float]:
    """The busy seconds of each timed stage, summed over the shards' done markers."""
    return {s: sum(m["busy"].get(s, 0.0) for m in markers.values()) for s in timed_stages()}
