"""A light HTTP/1.1 load generator for `bench api`, run in its own process.

It imports nothing heavy (no torch, no transformers): the bench process has them loaded, and a
full garbage collection over those objects pauses a process for 200+ ms, which would show up as
the client's latency, not the server's. Keep-alive, one connection per client.

    python -m bench.httpload status --port P --ids-file F --clients 100 --seconds 15 [--every 0.1]
    python -m bench.httpload submit --port P --body-file F --count 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import percentile


class Conn:
    """One keep-alive HTTP/1.1 connection; `request` returns (status, body bytes)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def stats(latencies: list[float], errors: int, seconds: float) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(latencies) + errors,
        "errors": errors,
        "requests_per_s": round(len(latencies) / seconds, 1) if seconds else None,
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2) if ms else None,
        "seconds": round(seconds, 2),
    }


async def poll_status(port: int, ids: list[str], clients: int, seconds: float, every: float):
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal errors
        conn = Conn(port)
        n = i
        if every:  # spread the clients over the period, as independent pollers would be
            await asyncio.sleep(every * i / clients)
        try:
            while time.perf_counter() < stop:
                path = f"/v1/fine_tuning/jobs/{ids[n % len(ids)]}"
                n += clients
                t0 = time.perf_counter()
                try:
                    status, _ = await conn.request("GET", path)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    conn.close()
                    conn = Conn(port)
                    continue
                latencies.append(time.perf_counter() - t0) if status == 200 else None
                errors += status != 200
                if every:
                    await asyncio.sleep(max(0.0, every - (time.perf_counter() - t0)))
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return stats(latencies, errors, time.perf_counter() - t0)


async def submit_many(port: int, request: dict, n: int) -> tuple[dict[str, Any], list[str]]:
    """`n` copies of `request`, each with its own output_dir (`<output_dir>-<i>`): pending jobs
    that share one are refused with 409."""
    output = request.get("backend_config", {}).get("output_dir")
    bodies = []
    for i in range(n):
        if output:
            request = {**request, "backend_config": {**request["backend_config"]}}
            request["backend_config"]["output_dir"] = f"{output}-{i}"
        bodies.append(json.dumps(request).encode())
    latencies: list[float] = []
    ids: list[str] = []
    errors: list[str] = []

    async def one(body: bytes) -> None:
        conn = Conn(port)
        t0 = time.perf_counter()
        try:
            status, data = await conn.request("POST", "/v1/fine_tuning/jobs", body)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        finally:
            conn.close()
        if status == 200:
            latencies.append(time.perf_counter() - t0)
            ids.append(json.loads(data)["job_id"])
        else:
            errors.append(f"HTTP {status}: {data[:200]!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(body) for body in bodies))
    out = stats(latencies, len(errors), time.perf_counter() - t0)
    out["error_samples"] = errors[:5]
    return out, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.httpload")
    parser.add_argument("what", choices=["status", "submit"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ids-file", type=Path)
    parser.add_argument("--body-file", type=Path)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--every", type=float, default=0.0)
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.what == "status":
        ids = json.loads(args.ids_file.read_text())
        out = asyncio.run(poll_status(args.port, ids, args.clients, args.seconds, args.every))
        result: dict[str, Any] = {"stats": out}
    else:
        request = json.loads(args.body_file.read_text())
        out, ids = asyncio.run(submit_many(args.port, request, args.count))
        result = {"stats": out, "ids": ids}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
