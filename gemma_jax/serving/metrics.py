"""The server's Prometheus metrics, in one place: vLLM's names where vLLM has the metric, so its
dashboards work unchanged, and `gemma_jax:` names for the rest. Text exposition format 0.0.4,
written here (a few counters, gauges and histograms need no client library). Thread-safe: the
engine thread records, the web layer renders."""

from __future__ import annotations

import math
import threading

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")
REJECT_REASONS = ("queue_full", "starting", "draining", "failed", "invalid")


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _number(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else f"{float(x):.1f}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, base_labels: dict[str, str]):
        self.name, self.help, self.base = name, help_text, base_labels

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help_text, base_labels, label: str | None = None, values=()):
        super().__init__(name, help_text, base_labels)
        self.label = label
        self.values = {v: 0.0 for v in values} if label else {None: 0.0}

    def inc(self, amount: float = 1.0, value: str | None = None) -> None:
        self.values[value] = self.values.get(value, 0.0) + amount

    def render(self) -> list[str]:
        lines = self.header()
        for value, total in self.values.items():
            labels = dict(self.base, **({self.label: value} if self.label else {}))
            lines.append(f"{self.name}{_labels(labels)} {_number(total)}")
        return lines


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name, help_text, base_labels):
        super().__init__(name, help_text, base_labels)
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.base)} {_number(self.value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help_text, base_labels, buckets):
        super().__init__(name, help_text, base_labels)
        self.bounds = tuple(buckets) + (math.inf,)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def render(self) -> list[str]:
        lines, cumulative = self.header(), 0
        for bound, n in zip(self.bounds, self.counts):
            cumulative += n
            lines.append(f"{self.name}_bucket{_labels(dict(self.base, le=_number(bound)))} {cumulative}")
        lines.append(f"{self.name}_sum{_labels(self.base)} {_number(self.sum)}")
        lines.append(f"{self.name}_count{_labels(self.base)} {self.count}")
        return lines


class Metrics:
    """Every metric the server exports; `render()` is the /metrics body."""

    def __init__(self, model_name: str):
        base = {"model_name": model_name}
        self._lock = threading.Lock()
        self.running = Gauge("vllm:num_requests_running", "Requests in decode slots (prefilling or decoding).", base)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests in the queue, waiting for a slot.", base)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first token.", base,
                              TTFT_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Time between tokens of a request (a decode call of n tokens counts n times its "
                             "time / n).", base, ITL_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token.", base,
                             LATENCY_BUCKETS)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time from arrival to admission to a slot.",
                                    base, LATENCY_BUCKETS)
        self.prefill_time = Histogram("vllm:request_prefill_time_seconds",
                                      "Time from admission to the first token.", base, LATENCY_BUCKETS)
        self.decode_time = Histogram("vllm:request_decode_time_seconds", "Time from the first token to the last.",
                                     base, LATENCY_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens_total", "Prompt tokens prefilled.", base)
        self.generation_tokens = Counter("vllm:generation_tokens_total",
                                         "Tokens generated (cancelled requests included).", base)
        self.finished = Counter("vllm:request_success_total", "Requests finished, by reason.", base,
                                label="finished_reason", values=FINISH_REASONS)
        self.rejected = Counter("gemma_jax:requests_rejected_total",
                                "Requests refused before admission (429 queue_full, 503 starting/draining/failed, "
                                "400/404 invalid).", base, label="reason", values=REJECT_REASONS)
        self.decode_calls = Counter("gemma_jax:decode_calls_total",
                                    "Multi-step decode calls (host round trips) made by the engine.", base)
        self.prefill_calls = Counter("gemma_jax:prefill_calls_total", "Prefill chunks run by the engine.", base)
        self.slots = Gauge("gemma_jax:decode_slots", "Decode slots (max_batch).", base)
        self._all = (self.running, self.waiting, self.ttft, self.itl, self.e2e, self.queue_time, self.prefill_time,
                     self.decode_time, self.prompt_tokens, self.generation_tokens, self.finished, self.rejected,
                     self.decode_calls, self.prefill_calls, self.slots)

    @property
    def lock(self) -> threading.Lock:
        """Hold while recording several related figures, so a scrape sees them together."""
        return self._lock

    def render(self) -> str:
        with self._lock:
            return "\n".join(line for metric in self._all for line in metric.render()) + "\n"


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (for tests and the load-test client)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out
