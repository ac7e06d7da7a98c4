"""`ditrt serve`'s Prometheus metrics: a registry per app, the scheduler's gauges read at scrape
time. prometheus_client is imported when an app is made."""
from __future__ import annotations

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500)


class Metrics:
    """Prometheus metrics in a registry of their own (one per app: tests and Ray replicas run several)."""

    def __init__(self, service: "Service"):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ditrt_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("ditrt_request_latency_seconds", "HTTP request latency, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.sample_latency = Histogram("ditrt_sample_latency_seconds", "POST /v1/samples answered 200, by format",
                                        ["format"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("ditrt_rejected_requests", "POST /v1/samples refused before running, by reason",
                                ["reason"], registry=r)
        self.step = Histogram("ditrt_step_seconds", "One scheduler tick: the denoiser call(s) and the sampler math",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.rows = Histogram("ditrt_rows_per_call", "Rows per scheduler tick (denoiser call)",
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.decode = Histogram("ditrt_decode_seconds", "One decoder batch", buckets=LATENCY_BUCKETS, registry=r)
        self.decode_images = Histogram("ditrt_decode_images_per_call", "Images per decoder batch",
                                       buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        r.register(_SchedulerGauges(service))

    def observe(self, kind: str, count: int, seconds: float) -> None:
        """The scheduler's observer: called by its worker after each tick and decoder batch."""
        if kind == "step":
            self.step.observe(seconds)
            self.rows.observe(count)
        else:
            self.decode.observe(seconds)
            self.decode_images.observe(count)


class _SchedulerGauges:
    """Gauges read from the scheduler at scrape time."""

    def __init__(self, service: "Service"):
        self.service = service

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s = self.service.batcher.stats()
        for name, help, value in (
                ("ditrt_queue_depth", "Requests admitted and waiting to start", s["queue_depth"]),
                ("ditrt_requests_in_flight", "Requests running or waiting for the decoder", s["in_flight"]),
                ("ditrt_rows_in_flight", "Rows of the running requests (each model call)", s["in_flight_rows"]),
                ("ditrt_decode_queue_depth", "Finished requests waiting for the decoder", s["decode_queue"]),
                ("ditrt_ready", "1 when warmed up and taking requests", int(self.service.ready())),
                ("ditrt_draining", "1 while draining (SIGTERM)", int(self.service.draining))):
            yield GaugeMetricFamily(name, help, value=value)
        yield CounterMetricFamily("ditrt_engine_calls", "Scheduler ticks (denoiser calls before chunking)",
                                  value=s["backend_calls"])
        limits = GaugeMetricFamily("ditrt_limit", "The server's limits (GET /v1/model)", labels=["name"])
        for name, value in self.service.limits().items():
            if value is not None:  # timeout_s None: no deadline
                limits.add_metric([name], value)
        yield limits
