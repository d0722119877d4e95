"""A do-nothing SMTPD policy server: ``action=DUNNO`` to every request.

Run as its own process (``python -m bench.nullserver --port N``); bench.run
drives it like the real servers to show the load generator's ceiling on
this machine: no real server can look faster than this one.
"""

from __future__ import annotations

import argparse
import asyncio

REPLY = b"action=DUNNO\n\n"


class NullPolicy(asyncio.Protocol):
    """Counts request terminators and answers each one at once."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # Keep one byte of the previous chunk: "\n\n" may straddle two reads.
        data = self.tail + data
        n = data.count(b"\n\n")
        self.tail = data[-1:]
        if n and self.transport is not None:
            self.tail = b"" if data.endswith(b"\n\n") else data[data.rindex(b"\n\n") + 2:][-1:]
            self.transport.write(REPLY * n)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(NullPolicy, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
