"""Prometheus metrics: request counts and latencies per route, queue depth per lane, tokens/s, first audio,
perception stage timings.

A registry per app (not the process-global default) so several apps in one test process do not
collide. Labels use the route template (``/v1/vqa``), never anything the user sent.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .memory import rss_bytes

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)  # perception stages take milliseconds


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rpiq_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "rpiq_request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("rpiq_queue_depth", "jobs admitted and not finished, per lane", ["lane"], registry=r)
        self.rejected = Counter(
            "rpiq_rejected", "requests refused with 503: a lane or the image gate was full, or memory (lane=memory) "
            "above the ceiling", ["lane"], registry=r,
        )  # fmt: skip
        self.timeouts = Counter(
            "rpiq_timeouts",
            "requests that ran out of time (504, or an answer stopped early at the deadline)",
            registry=r,
        )
        self.cancelled = Counter(
            "rpiq_cancelled", "requests whose work was stopped early (client gone or timeout)", registry=r
        )
        self.tokens = Counter("rpiq_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_second = Gauge("rpiq_tokens_per_second", "decode speed of the last generation", registry=r)
        self.decodes = Counter(
            "rpiq_decodes",
            "generations by decode loop (lean: models.lean_decode; transformers)",
            ["decoder"],
            registry=r,
        )
        self.first_audio = Histogram(
            "rpiq_time_to_first_audio_seconds", "request start to first audio chunk (streaming)",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.perception = Histogram(
            "rpiq_perception_seconds", "time per perception stage (detect, pose, classify, colour, light, codes)",
            ["stage"], buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_loaded = Gauge("rpiq_model_loaded", "1 once the model is ready", registry=r)
        self.rss = Gauge("rpiq_resident_memory_bytes", "resident set size of the server process", registry=r)

    def timed_out(self) -> None:
        """A request ran out of time: its work was stopped, so it counts as cancelled too."""
        self.timeouts.inc()
        self.cancelled.inc()

    def observe_perception(self, timings_ms: dict[str, float]) -> None:
        """One photo's perception stage timings (milliseconds, as `Scene.timings_ms` holds them)."""
        for stage, ms in timings_ms.items():
            self.perception.labels(stage).observe(ms / 1000.0)

    def render(self, lanes: dict) -> bytes:
        for name, lane in lanes.items():
            self.queue_depth.labels(name).set(lane.depth)
        self.rss.set(rss_bytes() or 0)
        return generate_latest(self.registry)
