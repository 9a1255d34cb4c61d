"""Prometheus text exposition for the service: request counters, a latency histogram, the model version."""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Thread-safe counters; render() gives the /metrics body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.count: dict[str, int] = defaultdict(int)
        self.total: dict[str, float] = defaultdict(float)
        self.model_version = ""
        self.model_swaps = 0
        self.batches = 0
        self.batched_requests = 0

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency."""
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.count[endpoint] += 1
            self.total[endpoint] += seconds
            row = self.buckets[endpoint]
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    row[i] += 1

    def observe_batch(self, requests: int) -> None:
        """Count one forward pass that scored `requests` requests together."""
        with self._lock:
            self.batches += 1
            self.batched_requests += requests

    def render(self) -> str:
        """Prometheus text format 0.0.4."""
        with self._lock:
            lines = ["# HELP fedshop_requests_total Requests by endpoint and HTTP status.",
                     "# TYPE fedshop_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'fedshop_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += ["# HELP fedshop_request_errors_total Requests answered with a 4xx or 5xx status.",
                      "# TYPE fedshop_request_errors_total counter"]
            errors: dict[str, int] = defaultdict(int)
            for (endpoint, status), n in self.requests.items():
                if status >= 400:
                    errors[endpoint] += n
            for endpoint in sorted(self.count):
                lines.append(f'fedshop_request_errors_total{{endpoint="{endpoint}"}} {errors[endpoint]}')
            lines += ["# HELP fedshop_request_seconds Request latency.", "# TYPE fedshop_request_seconds histogram"]
            for endpoint in sorted(self.count):
                for bound, n in zip(BUCKETS, self.buckets[endpoint], strict=True):
                    lines.append(f'fedshop_request_seconds_bucket{{endpoint="{endpoint}",le="{bound}"}} {n}')
                lines.append(f'fedshop_request_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}} '
                             f'{self.count[endpoint]}')
                lines.append(f'fedshop_request_seconds_sum{{endpoint="{endpoint}"}} {self.total[endpoint]:.6f}')
                lines.append(f'fedshop_request_seconds_count{{endpoint="{endpoint}"}} {self.count[endpoint]}')
            lines += ["# HELP fedshop_model_info The model being served.", "# TYPE fedshop_model_info gauge",
                      f'fedshop_model_info{{version="{self.model_version}"}} 1',
                      "# HELP fedshop_model_swaps_total Models swapped in since start.",
                      "# TYPE fedshop_model_swaps_total counter", f"fedshop_model_swaps_total {self.model_swaps}",
                      "# HELP fedshop_score_batches_total Forward passes run by the micro-batcher.",
                      "# TYPE fedshop_score_batches_total counter", f"fedshop_score_batches_total {self.batches}",
                      "# HELP fedshop_batched_requests_total Requests scored by those passes.",
                      "# TYPE fedshop_batched_requests_total counter",
                      f"fedshop_batched_requests_total {self.batched_requests}"]
        return "\n".join(lines) + "\n"
