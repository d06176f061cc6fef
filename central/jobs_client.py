"""A small client of central's jobs API, for the CLI: submit, follow the events with a progress bar, fetch the
images, list, show and cancel. Synchronous httpx; errors come back as ``TriptychError`` with central's message.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import httpx

from shared.errors import StageUnavailable, TriptychError

TERMINAL = ("succeeded", "failed", "canceled")


class JobsClient:
    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise StageUnavailable(f"cannot reach central at {self.url}: {exc}") from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                message = f"{r.status_code} {err['type']}: {err['message']}"
            except (ValueError, KeyError, TypeError):
                message = f"central answered HTTP {r.status_code}"
            raise TriptychError(message)
        return r

    def submit(self, task: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/jobs", json={"task": task, **body}).json()
        return result

    def get(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}").json()
        return result

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/jobs", params={"limit": limit}).json()["jobs"]
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/cancel").json()
        return result

    def image(self, job_id: str, index: int = 0) -> bytes:
        return self._call("GET", f"/v1/jobs/{job_id}/images/{index}").content

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's events as (name, data), from the first, until the terminal one; a dropped stream is
        resumed with ``Last-Event-ID``."""
        last = 0
        while True:
            headers = {"Last-Event-ID": str(last)} if last else {}
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
                    if r.status_code >= 400:
                        r.read()
                        self._call("GET", f"/v1/jobs/{job_id}")  # raises the envelope's message
                    name, data = "", ""
                    for line in r.iter_lines():
                        if line.startswith("id: "):
                            last = int(line[4:])
                        elif line.startswith("event: "):
                            name = line[7:]
                        elif line.startswith("data: "):
                            data = line[6:]
                        elif not line and name:
                            yield name, json.loads(data)
                            if name in TERMINAL:
                                return
                            name, data = "", ""
            except httpx.TransportError:
                continue  # resume after the last event seen
            if self.get(job_id)["status"] in TERMINAL:  # the stream ended after the end (a replica's restart)
                return

    def follow(self, job_id: str, out: TextIO = sys.stderr) -> dict[str, Any]:
        """Follow a job with a progress bar on ``out`` (tqdm; plain lines when ``out`` is not a terminal) and
        return the finished job."""
        from tqdm import tqdm

        bar: Any = None
        try:
            for name, data in self.events(job_id):
                if name == "progress":
                    if bar is None:
                        bar = tqdm(total=data["steps"], unit="step", file=out, desc=job_id[:8], leave=True)
                    bar.update(data["step"] - bar.n)
                elif name in ("requeued", "started") and bar is not None:
                    bar.reset()
        finally:
            if bar is not None:
                bar.close()
        return self.get(job_id)
