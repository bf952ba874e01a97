"""Prometheus metrics for ``postgate serve``: the sink behind ``postgate.policy.metrics`` and ``/metrics``.

The parts count through ``policy/metrics.py`` (no-op by default); the daemon calls :func:`enable` before it
starts its workers, which installs a Prometheus sink in this and every worker process. With
``[server] workers`` > 1 each process counts on its own, so the counters live in prometheus-client's
multiprocess mode: every process writes its values to memory-mapped files in one directory
(``$PROMETHEUS_MULTIPROC_DIR``, which the workers inherit) and the main process sums them at scrape time.
The queue's size and age are measured by the main process when scraped. ``/metrics`` is served by the
main process on ``[metrics] listen`` in the text exposition format (``promtool check metrics`` clean).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from postgate.policy import metrics as vocab

log = logging.getLogger("postgate.metrics")
PREFIX = "postgate_"
ENV = "PROMETHEUS_MULTIPROC_DIR"


class PrometheusSink:
    """prometheus-client metrics made from the declarations in ``policy/metrics.py``."""

    def __init__(self) -> None:
        import prometheus_client as pc  # after $PROMETHEUS_MULTIPROC_DIR is set: the value class depends on it
        self.metrics: dict[str, Any] = {}
        registry = pc.CollectorRegistry()  # unregistered: the multiprocess collector reads the files instead
        for name, m in vocab.METRICS.items():
            full = PREFIX + name
            if m.kind == "counter":
                self.metrics[name] = pc.Counter(full, m.help, m.labels, registry=registry)
            elif m.kind == "histogram":
                self.metrics[name] = pc.Histogram(full, m.help, m.labels, buckets=m.buckets, registry=registry)
            else:
                self.metrics[name] = pc.Gauge(full, m.help, m.labels, registry=registry,
                                              multiprocess_mode="livesum")

    def inc(self, name: str, value: float, labels: dict[str, str]) -> None:
        self.metrics[name].labels(**labels).inc(value)

    def observe(self, name: str, value: float, labels: dict[str, str]) -> None:
        self.metrics[name].labels(**labels).observe(value)

    def add(self, name: str, value: float, labels: dict[str, str]) -> None:
        self.metrics[name].labels(**labels).inc(value)


def prepare_directory(owner: tuple[int, int] | None = None) -> str:
    """A fresh multiprocess directory, exported in the environment so that workers inherit it."""
    old = os.environ.get(ENV)
    if old and os.path.isdir(old) and os.path.basename(old).startswith("postgate-metrics-"):
        shutil.rmtree(old, ignore_errors=True)
    d = tempfile.mkdtemp(prefix="postgate-metrics-")
    if owner is not None:
        os.chown(d, *owner)
    os.environ[ENV] = d
    return d


def enable() -> None:
    """Count for real in this process (the directory must be prepared, or inherited from the main process)."""
    vocab.install(PrometheusSink())


def process_gone(pid: int) -> None:
    """A worker exited: its live gauges (sessions) no longer count."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


QueueSummary = Callable[[], tuple[Mapping[str, int], float | None]]   # messages per state, oldest arrival


class QueueCollector:
    """``postgate_queue_messages{state}`` and ``postgate_queue_oldest_age_seconds``, measured at scrape from
    the spool's summary (``Spool.summary``: one aggregate query on the shared queue, not a listing)."""

    def __init__(self, summary: QueueSummary) -> None:
        self.summary = summary

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily
        counts: dict[str, int] = {"incoming": 0, "active": 0, "deferred": 0, "hold": 0}
        by_state, oldest = self.summary()
        counts.update(by_state)
        size = GaugeMetricFamily(PREFIX + "queue_messages", "Messages in the queue, by state", labels=["state"])
        for state, n in sorted(counts.items()):
            size.add_metric([state], n)
        yield size
        yield GaugeMetricFamily(PREFIX + "queue_oldest_age_seconds", "Age of the oldest queued message "
                                "(0 when the queue is empty)", value=0 if oldest is None else time.time() - oldest)


def exposition(queue_summary: QueueSummary | None = None) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, os.environ[ENV])  # type: ignore[no-untyped-call]
    if queue_summary is not None:
        registry.register(QueueCollector(queue_summary))
    return bytes(generate_latest(registry))


async def serve_http(host: str, port: int, render: Callable[[], bytes]) -> asyncio.Server:
    """A minimal HTTP/1.0 server for ``GET /metrics`` (render runs in a thread: it reads files)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] in ("GET", "HEAD") and parts[1].split("?")[0] == "/metrics":
                body = await asyncio.get_running_loop().run_in_executor(None, render)
                head = ("HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()
                writer.write(head + (body if parts[0] == "GET" else b""))
            else:
                writer.write(b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnot found: try /metrics\n")
            await writer.drain()
        except (OSError, TimeoutError, UnicodeDecodeError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
    return await asyncio.start_server(handle, host.strip("[]"), port)
