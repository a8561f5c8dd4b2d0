"""``python -m browservm.guest.streamer``: see :mod:`browservm.guest.streamer`."""

from __future__ import annotations

import asyncio
import sys

from browservm.guest.streamer.options import parse_args
from browservm.guest.streamer.server import Streamer


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)

    async def run() -> int:
        return await Streamer(options).run()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
