"""Command line: `msc3391-proxy --config PATH` (same as `python -m proxy --config PATH`),
`msc3391-proxy inspect --config PATH`, `msc3391-proxy migrate-store --config PATH --to URL`,
`msc3391-proxy nginx-config --config PATH`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from . import nginx_config
from .config import Config, ConfigError, PostgresURL, load_config, postgres_url
from .inspection import pending_report, render_json, render_text
from .logs import reopen, setup_logging
from .routes import ROUTES
from .server import ProxyServer
from .store import StoreConfigError, StoreError, open_store
from .store.migration import copy_to_postgres

log = logging.getLogger("proxy")


async def inspect(config: Config, as_json: bool) -> str:
    store = open_store(config.store)
    await store.open(exclusive=False)  # beside the running proxy
    try:
        report = await pending_report(store)
    finally:
        await store.close()
    return render_json(report) if as_json else render_text(report)


async def migrate_store(config: Config, target: PostgresURL) -> str:
    copied = await copy_to_postgres(config.store.path, target)
    return (
        f"copied {copied.tombstones} tombstone(s), {copied.rows} row(s) and {copied.deliveries} delivery"
        f" record(s) from {config.store.path} to {target}"
    )


def run_on_store(work: Coroutine[Any, Any, str | None]) -> int:
    """Runs a command that uses the store and prints what it returns, if anything: exit
    status 0; 2 for a store that is misconfigured, 1 for one that fails."""
    try:
        output = asyncio.run(work)
    except StoreConfigError as e:
        print(f"msc3391-proxy: config error: {e}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"msc3391-proxy: store error: {e}", file=sys.stderr)
        return 1
    if output is not None:
        print(output)
    return 0


def add_nginx_config_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = nginx_config.NginxOptions()
    nginx = parser.add_argument_group("nginx-config")
    nginx.add_argument(
        "--listen", default=defaults.listen, metavar="[ADDR:]PORT", help="the server block's listen"
    )
    nginx.add_argument("--server-name", default=defaults.server_name, metavar="NAME", help="its server_name")
    nginx.add_argument(
        "--section",
        choices=nginx_config.SECTIONS,
        default=defaults.section,
        help="all: a complete file for the http context; upstreams (http context) and locations "
        "(inside your own server block): its halves",
    )
    nginx.add_argument(
        "--proxy",
        action="append",
        default=[],
        metavar="ADDR:PORT",
        help="a proxy instance (repeat for several, round-robin); default: listen.host:listen.port",
    )
    nginx.add_argument(
        "--max-body-size", default=defaults.max_body_size, metavar="SIZE", help="client_max_body_size"
    )


def print_nginx_config(config: Config, args: argparse.Namespace) -> int:
    try:
        options = nginx_config.NginxOptions(
            listen=nginx_config.parse_listen(args.listen),
            server_name=nginx_config.parse_server_name(args.server_name),
            section=args.section,
            proxies=tuple(nginx_config.parse_address(text) for text in args.proxy),
            max_body_size=nginx_config.parse_size(args.max_body_size),
        )
        text = nginx_config.render(config, ROUTES, options)
    except nginx_config.NginxConfigError as e:
        print(f"msc3391-proxy: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


async def serve(config: Config, log_handler: logging.Handler) -> None:
    async with ProxyServer(config):
        # What exists now lives as long as the process (modules, the route table, the
        # store's indexes as loaded): kept out of the collector's scans for good. And a
        # request makes a few hundred short-lived containers, nearly all freed by their
        # reference counts: collecting the youngest generation after 5,000 allocations
        # instead of 700 leaves most to die unscanned. Each cut the CPU of a small owned
        # request by about a sixth on this machine (`bench/run.py`, /versions). 20,000
        # saved no more, and with 10,000 long-polls held its larger scans stalled the
        # loop: a small request's p99 went from 3-25 ms to 20-200 ms (`bench/run.py`,
        # memory).
        gc.freeze()
        gc.set_threshold(5_000, *gc.get_threshold()[1:])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reopen, log_handler)
        await stop.wait()
        log.info(
            "shutting down: new connections refused, in-flight requests get %.0f s",
            config.proxy.shutdown_grace,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="msc3391-proxy",
        description="MSC3391 account data deletion in front of any Matrix homeserver.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("serve", "inspect", "migrate-store", "nginx-config"),
        default="serve",
        help="serve (the default) runs the proxy; inspect prints the pending deletions in the store;"
        " migrate-store copies the SQLite store into PostgreSQL (--to); nginx-config prints nginx's"
        " configuration for this proxy and its homeserver",
    )
    parser.add_argument("--config", required=True, metavar="PATH", help="the TOML configuration file")
    parser.add_argument("--json", action="store_true", help="inspect: print JSON for scripts")
    parser.add_argument("--to", metavar="URL", help="migrate-store: postgresql://USER@HOST:PORT/DBNAME")
    parser.add_argument("--password-file", default="", metavar="PATH", help="migrate-store: the password")
    add_nginx_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        target = None
        if args.command == "migrate-store":
            target = postgres_url(args.to or "", args.password_file, Path.cwd(), key="--to")
    except ConfigError as e:
        print(f"msc3391-proxy: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "migrate-store":
        if target is None:
            print("msc3391-proxy: config error: --to: migrate-store needs postgresql://...", file=sys.stderr)
            return 2
        return run_on_store(migrate_store(config, target))
    if args.command == "nginx-config":
        return print_nginx_config(config, args)
    if args.command == "inspect":
        return run_on_store(inspect(config, args.json))
    try:
        handler = setup_logging(
            config.proxy.log_level, config.proxy.log_format, config.proxy.log_file or None
        )
    except OSError as e:
        print(
            f"msc3391-proxy: cannot open the log file {config.proxy.log_file}: {e.strerror}", file=sys.stderr
        )
        return 1
    try:
        return run_on_store(serve(config, handler))
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
