"""GET /metrics: the engine's numbers in Prometheus' text format, read at scrape time (prometheus_client).

A collector over engine.snapshot() rather than metric objects updated as jobs run: the engine stays free of any
exporter, and each scrape sees one consistent picture. Counters are totals since start (rate() them); the
*_per_second gauges average the last minute for a glance without Prometheus.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PREFIX = "qistudio"


def _histogram(name: str, doc: str, histogram) -> HistogramMetricFamily:
    buckets, running = [], 0
    for bound, count in zip(histogram.bounds, histogram.counts):
        running += count
        buckets.append((str(bound), running))
    buckets.append(("+Inf", histogram.count))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=histogram.total)


class EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        snap = self.engine.snapshot()
        stats = snap["stats"]
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Jobs waiting for a worker", value=snap["queue"])
        yield GaugeMetricFamily(f"{PREFIX}_jobs_running", "Jobs running on a worker", value=snap["running"])
        jobs = CounterMetricFamily(f"{PREFIX}_jobs", "Finished jobs by final status", labels=["status"])
        for status in ("succeeded", "failed", "cancelled"):
            jobs.add_metric([status], stats.jobs.get(status, 0))
        yield jobs
        yield CounterMetricFamily(f"{PREFIX}_images", "Images made", value=stats.images)
        yield CounterMetricFamily(f"{PREFIX}_steps", "Denoising steps run (one per batched DiT call)",
                                  value=stats.steps)
        yield CounterMetricFamily(f"{PREFIX}_image_steps", "Denoising steps times the images in them",
                                  value=stats.image_steps)
        yield GaugeMetricFamily(f"{PREFIX}_images_per_second", "Images made per second over the last minute",
                                value=snap["images_per_second"])
        yield GaugeMetricFamily(f"{PREFIX}_steps_per_second", "Denoising steps per second over the last minute",
                                value=snap["steps_per_second"])
        yield _histogram(f"{PREFIX}_step_seconds", "Seconds per denoising step (one batched DiT call)",
                         stats.step_seconds)
        yield _histogram(f"{PREFIX}_job_seconds", "Seconds from submission to the end of a job", stats.latency_seconds)
        batches = CounterMetricFamily(f"{PREFIX}_batches", "Batches run, by jobs per batch", labels=["jobs"])
        for size, count in sorted(stats.batch_sizes.items()):
            batches.add_metric([str(size)], count)
        yield batches
        yield from self._workers(snap["workers"], stats)

    def _workers(self, workers, stats):
        up = GaugeMetricFamily(f"{PREFIX}_worker_up", "1 while the worker can take jobs", labels=["worker", "device"])
        restarts = CounterMetricFamily(f"{PREFIX}_worker_restarts", "Worker processes restarted after dying",
                                       labels=["worker", "device"])
        memory = GaugeMetricFamily(f"{PREFIX}_worker_memory_bytes", "Memory a worker uses: host_resident, and on a "
                                   "GPU device_allocated, device_reserved and device_peak", labels=["worker", "device",
                                                                                                     "kind"])
        for worker in workers:
            labels = [str(worker["index"]), worker["device"]]
            up.add_metric(labels, 1.0 if worker["state"] in ("idle", "busy") else 0.0)
            restarts.add_metric(labels, worker["restarts"])
            for kind, value in worker["memory"].items():
                memory.add_metric([*labels, kind], value)
        yield up
        yield restarts
        yield memory
        yield CounterMetricFamily(f"{PREFIX}_worker_deaths", "Worker processes that died", value=stats.worker_deaths)


def registry_for(engine) -> CollectorRegistry:
    """A registry of this engine's metrics only (not the process-global one, so several apps can coexist)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    return registry
