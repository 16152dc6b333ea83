"""The run's numbers as the driver sees them (`RunMetrics`), its Prometheus endpoint, and the poll that feeds both
the endpoint and `paceflow status`.

Why prometheus-client in the driver rather than Ray's metrics API in every process: the driver already receives
every number that matters, as the same records that go to metrics.jsonl (each learner step's result, each
evaluation) and by polling (`RolloutActor.counters()`, `store.stats()` every `metrics.poll_s`). One endpoint per
run means one scrape target, values identical to the run's files, the same behaviour on a laptop and on a
cluster, no port per actor, and no dependence on Ray's metrics agent (whose metric names and export interval
change between Ray versions). What it costs: actor numbers are at most `poll_s` old, and they stop with the
driver (as the run does).

Names follow Prometheus conventions: `paceflow_` prefix, base units in the name (`_seconds`, `_tokens`),
`_total` for counters (cumulative values as the components count them; use rate() for throughput). Every
series carries `run` (the run's name); per-actor series carry `actor`.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from configs.schema import MetricsConfig
from replay.store import ReplayStats

# Learner step metrics exported as gauges: name in the step's metrics -> (metric name, help).
_LEARNER_GAUGES = {
    "loss": ("paceflow_learner_loss", "Objective value of the last step"),
    "delta_abs_mean": (
        "paceflow_learner_residual_abs",
        "Mean |delta| (the TB residual, or the advantage) of the last step",
    ),
    "response_len_mean": ("paceflow_learner_response_tokens", "Mean response length in the last batch"),
    "log_z_mean": ("paceflow_learner_log_z", "Mean log Z over the last batch"),
    "calib_mae": (
        "paceflow_learner_calibration_error",
        "Mean |a(x) - group accuracy| over the last batch's fresh groups",
    ),
    "calib_mae_const": ("paceflow_learner_calibration_error_constant", "The same error for a constant estimate"),
    "calib_corr": ("paceflow_learner_calibration_correlation", "Correlation of a(x) with group accuracy"),
    "failed_frac": ("paceflow_learner_failed_fraction", "Share of on-policy responses with reward < 1"),
    "priority_p10": ("paceflow_replay_sampled_priority_p10", "10th percentile of the drawn groups' priorities"),
    "priority_p50": ("paceflow_replay_sampled_priority_p50", "Median of the drawn groups' priorities"),
    "priority_p90": ("paceflow_replay_sampled_priority_p90", "90th percentile of the drawn groups' priorities"),
}


class RunMetrics:
    """Holds the latest numbers of a run and renders them as Prometheus metric families on each scrape."""

    def __init__(self, run: str) -> None:
        self.run = run
        self._lock = threading.Lock()
        self._step: dict[str, Any] = {}
        self._learner_totals = {"steps": 0, "tokens": 0, "rows": 0, "step_seconds": 0.0, "wait_seconds": 0.0}
        self._actors: list[dict[str, Any]] = []
        self._replay: dict[str, Any] = {}
        self._heldout: dict[str, float] = {}
        self.updated = time.monotonic()
        self.scraped: float | None = None
        """When a scraper last read the endpoint (None: nobody scrapes it)."""

    # ------------------------------------------------------------------------------------------ inputs
    def observe_step(self, result: Mapping[str, Any]) -> None:
        with self._lock:
            self._step = dict(result)
            t = self._learner_totals
            t["steps"] = int(result["step"])
            t["tokens"] += int(result["tokens"])
            t["rows"] += int(result["rows"])
            t["step_seconds"] += float(result["compute_s"]) + float(result["publish_s"])
            t["wait_seconds"] += float(result["wait_s"])
            self.updated = time.monotonic()

    def observe_actors(self, counters: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            self._actors = [dict(c) for c in counters]

    def observe_replay(self, stats: Mapping[str, Any]) -> None:
        with self._lock:
            self._replay = dict(stats)

    def latest(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The last polled actor counters and replay statistics (also what `paceflow status` shows)."""
        with self._lock:
            return [dict(c) for c in self._actors], dict(self._replay)

    def observe_eval(self, record: Mapping[str, Any]) -> None:
        with self._lock:
            self._heldout = {
                name: float(est["mean"])
                for name, est in record["metrics"].items()
                if isinstance(est, Mapping) and est.get("mean") is not None
            }
            self.updated = time.monotonic()

    # ------------------------------------------------------------------------------------------ output
    def collect(self) -> Iterable[Metric]:
        with self._lock:
            yield from self._learner()
            yield from self._rollout()
            yield from self._replay_families()
            yield from self._learning()
            self.scraped = time.monotonic()

    def _gauge(self, name: str, doc: str, value: float, labels: Mapping[str, str] | None = None) -> Metric:
        labels = {"run": self.run, **(labels or {})}
        family = GaugeMetricFamily(name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)
        return family

    def _counter(self, name: str, doc: str, value: float, labels: Mapping[str, str] | None = None) -> Metric:
        labels = {"run": self.run, **(labels or {})}
        family = CounterMetricFamily(name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)
        return family

    def _learner(self) -> Iterable[Metric]:
        t = self._learner_totals
        yield self._counter("paceflow_learner_steps", "Learner optimizer steps", t["steps"])
        yield self._counter("paceflow_learner_tokens", "Tokens (prompt + response) trained on", t["tokens"])
        yield self._counter("paceflow_learner_samples", "Responses trained on", t["rows"])
        yield self._counter(
            "paceflow_learner_step_seconds", "Seconds spent computing and publishing", t["step_seconds"]
        )
        yield self._counter("paceflow_learner_wait_seconds", "Seconds the learner waited for data", t["wait_seconds"])
        r = self._step
        if not r:
            return
        yield self._gauge("paceflow_learner_weight_version", "Newest published weight version", r["version"])
        yield self._gauge("paceflow_learner_last_step_seconds", "Compute time of the last step", r["compute_s"])
        yield self._gauge("paceflow_learner_publish_seconds", "Time to publish the last weights", r["publish_s"])
        yield self._gauge("paceflow_learner_grad_norm", "Gradient norm of the last step", r["grad_norm"])
        yield self._gauge("paceflow_learner_policy_lag_versions", "Mean policy lag of the last batch", r["lag_mean"])
        yield self._gauge("paceflow_learner_policy_lag_max_versions", "Max policy lag of the last batch", r["lag_max"])
        for key, (name, doc) in _LEARNER_GAUGES.items():
            value = r["metrics"].get(key)
            if value is not None and math.isfinite(value):
                yield self._gauge(name, doc, value)

    def _rollout(self) -> Iterable[Metric]:
        alive = [c for c in self._actors if c.get("alive")]
        yield self._gauge("paceflow_rollout_actors", "Rollout actors whose loop is running", len(alive))
        per_actor: list[tuple[str, str, str, type[CounterMetricFamily] | type[GaugeMetricFamily]]] = [
            ("tokens", "paceflow_rollout_tokens", "Response tokens generated", CounterMetricFamily),
            ("responses", "paceflow_rollout_responses", "Responses generated", CounterMetricFamily),
            ("groups", "paceflow_rollout_groups", "Rollout groups pushed into the replay", CounterMetricFamily),
            ("generate_s", "paceflow_rollout_generate_seconds", "Seconds spent in engine calls", CounterMetricFamily),
            ("steps", "paceflow_rollout_engine_calls", "Engine calls (batches of prompts)", CounterMetricFamily),
            (
                "wait_s",
                "paceflow_rollout_wait_seconds",
                "Seconds waiting on the rate limit (rollout.max_ahead_batches) or for the turn (learner.sync)",
                CounterMetricFamily,
            ),
            ("reward_errors", "paceflow_rollout_reward_errors", "Verifier calls that raised", CounterMetricFamily),
            (
                "reward_timeouts",
                "paceflow_rollout_reward_timeouts",
                "Verifier calls that timed out",
                CounterMetricFamily,
            ),
            ("last_generate_s", "paceflow_rollout_generation_latency_seconds", "Last engine call", GaugeMetricFamily),
            ("weight_version", "paceflow_rollout_weight_version", "Weight version the engine holds", GaugeMetricFamily),
        ]
        for key, name, doc, kind in per_actor:
            family = kind(name, doc, labels=["run", "actor"])
            for c in self._actors:
                if "actor_id" in c and key in c:
                    family.add_metric([self.run, str(c["actor_id"])], float(c[key]))
            yield family

    def _replay_families(self) -> Iterable[Metric]:
        s = self._replay
        if not s:
            return
        yield self._gauge("paceflow_replay_groups", "Groups in the main table", s["size"])
        yield self._gauge("paceflow_replay_fresh_groups", "Groups never sampled yet", s["fresh"])
        yield self._gauge(
            "paceflow_replay_success_buffer_responses", "Responses in the success buffer", s["success_size"]
        )
        yield self._counter("paceflow_replay_inserted_groups", "Groups inserted", s["inserted"])
        yield self._counter("paceflow_replay_duplicate_groups", "Inserts dropped as duplicates", s["duplicates"])
        yield self._counter("paceflow_replay_sampled_groups", "Groups drawn by the learner", s["sampled"])
        yield self._counter(
            "paceflow_replay_corrupt_records", "Records that failed to decode (quarantined)", s["corrupt"]
        )
        yield self._counter(
            "paceflow_replay_unsampled_evicted_groups",
            "Groups evicted before any batch drew them (generated, never trained on)",
            s["evicted_unsampled"],
        )
        yield self._counter(
            "paceflow_replay_late_evicted_groups",
            "Groups evicted undrawn that arrived on their last valid version (generated in max_policy_lag steps)",
            s.get("evicted_late", 0),
        )
        yield self._counter(
            "paceflow_replay_stale_on_arrival_groups",
            "Groups refused on arrival: made by weights over replay.max_policy_lag versions old",
            s.get("stale_on_arrival", 0),
        )
        yield self._gauge(
            "paceflow_replay_drawn_ratio",
            "Share of the inserted groups that some batch has drawn",
            ReplayStats(**s).drawn_fraction,
        )
        evicted = CounterMetricFamily("paceflow_replay_evicted_groups", "Groups evicted", labels=["run", "reason"])
        evicted.add_metric([self.run, "capacity"], s["evicted_capacity"])
        evicted.add_metric([self.run, "stale"], s["evicted_stale"])
        yield evicted

    def _learning(self) -> Iterable[Metric]:
        r = self._step
        if r and math.isfinite(r["reward_mean"]):
            yield self._gauge("paceflow_reward", "Mean on-policy reward of the last batch", r["reward_mean"])
        if self._heldout:
            family = GaugeMetricFamily("paceflow_heldout", "Last held-out evaluation", labels=["run", "metric"])
            for name, value in self._heldout.items():
                family.add_metric([self.run, name], value)
            yield family


class Poller:
    """Calls `poll()` at once and then every `interval_s` on a daemon thread until closed. A failing poll (a dead
    actor, a restarting Redis) is skipped: the next one tries again."""

    def __init__(self, interval_s: float, poll: Callable[[], None]) -> None:
        self._poll, self._interval_s = poll, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-poll", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self._poll()
            if self._stop.wait(self._interval_s):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval_s + 5)


class MetricsServer:
    """`RunMetrics` behind an HTTP endpoint at http://cfg.host:cfg.port/metrics."""

    def __init__(self, cfg: MetricsConfig, metrics: RunMetrics) -> None:
        self.metrics = metrics
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(metrics)  # a collector: it has collect()
        self._server, self._thread = start_http_server(cfg.port, addr=cfg.host, registry=self.registry)
        self.port = int(self._server.server_port)
        self.url = f"http://{cfg.host}:{self.port}/metrics"

    def close(self, final_scrape_wait_s: float = 30.0) -> None:
        """Stop serving; if a scraper has been reading the endpoint, first give it the chance to read the final
        numbers (up to `final_scrape_wait_s`), so the last step shows on the dashboards."""
        deadline = time.monotonic() + final_scrape_wait_s
        while self.metrics.scraped is not None and self.metrics.scraped < self.metrics.updated:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self._server.shutdown()
        self._server.server_close()
