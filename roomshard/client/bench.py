"""``python -m roomshard.client.bench``: end-to-end latency through the client library.

``--senders`` sessions each send at ``--rate`` messages/s (under the shard's
per-connection limit) into one room for ``--seconds``; one more session
receives. Reports send->ack and send->delivery latency percentiles (ms) and
the delivered rate, and checks that the receiver got every acked message
once, in seq order. Run it against any service, e.g. one from
``roomshard dev --port 0``::

    python -m roomshard.client.bench --directory-url http://127.0.0.1:8080 --senders 10 --seconds 10
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import click

from roomshard.client import Message, Session, connect


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": qs[49], "p95": qs[94], "p99": qs[98], "max": max(values)}


async def _run(directory_url: str, room: str, senders: int, rate: float, seconds: float) -> dict:
    sent_at: dict[str, float] = {}
    acked: dict[str, float] = {}
    delivered: dict[str, float] = {}
    seqs: list[int] = []
    async with connect(directory_url, room, "receiver") as rx:
        sessions: list[Session] = [await connect(directory_url, room, f"sender{i}") for i in range(senders)]

        async def receive() -> None:
            async for item in rx:
                if isinstance(item, Message):
                    delivered[item.id] = time.perf_counter()
                    seqs.append(item.seq)

        async def send(s: Session) -> None:
            interval = 1.0 / rate
            end = time.perf_counter() + seconds
            futs = []
            while time.perf_counter() < end:
                mid = uuid.uuid4().hex
                sent_at[mid] = time.perf_counter()
                fut = s.send("x" * 32, id=mid)
                fut.add_done_callback(lambda f, mid=mid: acked.__setitem__(mid, time.perf_counter()))
                futs.append(fut)
                await asyncio.sleep(interval)
            await asyncio.gather(*futs)

        reader = asyncio.create_task(receive())
        t0 = time.perf_counter()
        await asyncio.gather(*(send(s) for s in sessions))
        deadline = time.perf_counter() + 30
        while len(delivered) < len(acked) and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
        reader.cancel()
        for s in sessions:
            await s.close()
    ack_ms = [(acked[m] - sent_at[m]) * 1000 for m in acked]
    del_ms = [(delivered[m] - sent_at[m]) * 1000 for m in delivered if m in sent_at]
    return {"sent": len(sent_at), "acked": len(acked), "delivered": len(delivered),
            "in_order_once": seqs == sorted(set(seqs)), "delivered_per_s": len(delivered) / elapsed,
            "ack_ms": percentiles(ack_ms), "delivery_ms": percentiles(del_ms)}


@click.command()
@click.option("--directory-url", default="http://127.0.0.1:8080", show_default=True)
@click.option("--room", default=None, help="room id (default: a fresh one)")
@click.option("--senders", default=10, show_default=True)
@click.option("--rate", default=10.0, show_default=True, help="messages/s per sender")
@click.option("--seconds", default=10.0, show_default=True)
def main(directory_url: str, room: str | None, senders: int, rate: float, seconds: float) -> None:
    """Measure send->ack and send->delivery latency through the client library."""
    res = asyncio.run(_run(directory_url, room or f"bench-{uuid.uuid4().hex[:8]}", senders, rate, seconds))
    click.echo(f"sent {res['sent']}, acked {res['acked']}, delivered {res['delivered']} "
               f"({res['delivered_per_s']:.0f}/s), each once in seq order: {res['in_order_once']}")
    for name in ("ack_ms", "delivery_ms"):
        p = res[name]
        click.echo(f"{name:12} " + "  ".join(f"{k} {v:.2f}" for k, v in p.items()))


if __name__ == "__main__":
    main()
