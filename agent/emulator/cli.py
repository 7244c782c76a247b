"""Command line entry point: run the platform emulator until SIGINT/SIGTERM.

    python -m agent.emulator --port 8080 --token-ttl 300

Prints one line ``emulator listening on <url>`` to stdout (the agent's base URL is
``<url>/v1``, the operator endpoints are under ``<url>/emulator``) and logs requests with
structlog to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from collections.abc import Sequence

import structlog

from agent.emulator.app import Emulator
from agent.netaddr import is_loopback_host

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of :func:`main`."""
    parser = argparse.ArgumentParser(
        prog="python -m agent.emulator",
        description="Local emulator of the Tellus platform's charger-side API (/v1/device/*).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one")
    parser.add_argument(
        "--token-ttl", type=float, default=86400.0, help="access-token lifetime, seconds"
    )
    parser.add_argument(
        "--secret-ttl", type=int, default=86400, help="expires_in reported at registration"
    )
    parser.add_argument(
        "--no-rate-limit", action="store_true", help="disable the per-device rate limits"
    )
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    return parser


def _configure_logging(level: str) -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


async def _serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    ssl_context: ssl.SSLContext | None = None
    if args.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
    emulator = Emulator(
        token_ttl=args.token_ttl,
        secret_ttl=args.secret_ttl,
        rate_limits_enabled=not args.no_rate_limit,
    )
    await emulator.start(args.host, args.port, ssl_context=ssl_context)
    print(f"emulator listening on {emulator.base_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await emulator.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator; return the process exit status (0 after a clean shutdown).

    Binds 127.0.0.1 unless ``--host`` says otherwise; a non-loopback address is logged as a
    warning because the emulator has no real security and is meant for local development.
    """
    args = build_parser().parse_args(argv)
    if args.tls_key and not args.tls_cert:
        print("--tls-key needs --tls-cert", file=sys.stderr)
        return 2
    _configure_logging(args.log_level)
    if not is_loopback_host(args.host):
        structlog.get_logger("agent.emulator").warning(
            "binding_non_loopback", host=args.host, note="the emulator is not secure"
        )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await _serve(args, stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"cannot start emulator: {exc}", file=sys.stderr)
        return 1
    return 0
