"""Command line: `msc3391-proxy --config PATH` (same as `python -m proxy --config PATH`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .config import Config, ConfigError, load_config
from .server import ProxyServer
from .store import StoreError

log = logging.getLogger("proxy")


async def serve(config: Config) -> None:
    async with ProxyServer(config):
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="msc3391-proxy",
        description="MSC3391 account data deletion in front of any Matrix homeserver.",
    )
    parser.add_argument("--config", required=True, metavar="PATH", help="the TOML configuration file")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"msc3391-proxy: config error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.proxy.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(config))
    except StoreError as e:
        print(f"msc3391-proxy: store error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(
            f"msc3391-proxy: cannot listen on {config.listen.host}:{config.listen.port}: {e.strerror}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
