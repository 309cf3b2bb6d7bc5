"""The live page's mesh-wide view (`serve --ui-prometheus URL`): every replica's diagnoses,
summed by Prometheus.

One replica sees only its own traffic. Prometheus already scrapes every replica and sums
them in the recording rules `extproc render monitoring` writes, so the page asks it (the
HTTP API's instant query, every `POLL_SECONDS`) rather than fanning out to replicas
itself. The answer is read off the request path, in a thread (urllib, as
`extproc.envoy_admin` does), capped in size and rows; a failed poll keeps the last view
and says why.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

# The recording rules (extproc/render/monitoring.py; tests/monitoring checks they match).
DIAGNOSES = "namespace_job_reason_cluster:extproc_diagnoses:rate5m"
DIAGNOSES_1H = "namespace_job_reason:extproc_diagnoses:rate1h"
RATE_QUERY = f"sum by (reason, cluster) ({DIAGNOSES})"
HOUR_QUERY = f"sum by (reason) ({DIAGNOSES_1H})"

POLL_SECONDS = 15.0  # Prometheus's own scrape and evaluation run at about this pace
TIMEOUT_SECONDS = 5.0
MAX_ANSWER = 4 * 1024 * 1024  # bytes of one query's answer; more is refused
MAX_ROWS = 2000  # series shown, highest rate first
MAX_TEXT = 256  # label values, in characters


class MeshViewError(ValueError):
    """The Prometheus URL or an answer is unusable (the message says why)."""


def prometheus_url(url: str) -> str:
    """The base URL of `--ui-prometheus`: http(s)://HOST[:PORT][/PATH], no query."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise MeshViewError(f"--ui-prometheus must be http(s)://HOST:PORT, got {url!r}")
    return url.rstrip("/")


def parse_vector(body: bytes) -> list[tuple[dict[str, str], float]]:
    """An instant query's vector as (labels, value); MeshViewError when it is not one."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise MeshViewError(f"Prometheus answered no JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("status") != "success":
        error = doc.get("error") if isinstance(doc, dict) else None
        raise MeshViewError(f"Prometheus answered an error: {str(error)[:MAX_TEXT]}")
    data = doc.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector":
        raise MeshViewError("Prometheus answered no instant vector")
    out = []
    for item in data.get("result") or []:
        try:
            labels = {str(k)[:MAX_TEXT]: str(v)[:MAX_TEXT] for k, v in item["metric"].items()}
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            continue
        if math.isfinite(value):
            out.append((labels, value))
    out.sort(key=lambda pair: -pair[1])
    return out[:MAX_ROWS]


class MeshView:
    """The last answer from Prometheus, as the page shows it."""

    def __init__(self, url: str, poll_seconds: float = POLL_SECONDS) -> None:
        self.url = prometheus_url(url)
        self.poll_seconds = poll_seconds
        self.rows: list[dict[str, Any]] = []
        self.per_reason_hour: dict[str, float] = {}
        self.at: float | None = None  # when the last good answer came
        self.error = ""

    def _query(self, expr: str, at: float | None) -> list[tuple[dict[str, str], float]]:
        params = {"query": expr} | ({} if at is None else {"time": f"{at:.3f}"})
        target = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(target, timeout=TIMEOUT_SECONDS) as answer:  # noqa: S310 (http(s) only, prometheus_url)
                body = answer.read(MAX_ANSWER + 1)
        except urllib.error.HTTPError as exc:
            body = exc.read(MAX_ANSWER + 1)
        except (OSError, ValueError) as exc:
            raise MeshViewError(f"cannot reach Prometheus at {self.url}: {exc}") from None
        if len(body) > MAX_ANSWER:
            raise MeshViewError(f"Prometheus answered more than {MAX_ANSWER} bytes")
        return parse_vector(body)

    def poll(self, at: float | None = None) -> None:
        """One poll (blocking: run it in a thread); keeps the last view on an error.

        `at`: evaluate at this time (a test compares with Prometheus at the same instant)."""
        try:
            rates = self._query(RATE_QUERY, at)
            hour = self._query(HOUR_QUERY, at)
        except MeshViewError as exc:
            self.error = str(exc)
            return
        self.rows = [
            {"reason": labels.get("reason", ""), "cluster": labels.get("cluster", ""),
             "per_minute": value * 60}
            for labels, value in rates
        ]  # fmt: skip
        self.per_reason_hour = {labels.get("reason", ""): value * 3600 for labels, value in hour}
        self.at, self.error = time.time(), ""

    def view(self) -> dict[str, Any]:
        return {
            "source": self.url,
            "at": self.at,
            "error": self.error,
            "rows": self.rows,
            "per_reason_hour": self.per_reason_hour,
        }

    async def run(self, changed: Callable[[], None]) -> None:
        """Poll until cancelled; `changed()` after each poll."""
        loop = asyncio.get_running_loop()
        while True:
            await loop.run_in_executor(None, self.poll)
            changed()
            await asyncio.sleep(self.poll_seconds)
