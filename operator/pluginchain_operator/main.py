"""``pluginchain operator``: run the kopf operator in this process."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from pluginchain._config.defaults import DEFAULTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)")
    parser.add_argument("--token-file", required=True, type=Path, help="the push token (a mounted Secret), shared with the sidecars")
    parser.add_argument("--tls-ca", type=Path, help="CA of the sidecars' ConfigService certificates (enables TLS)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate for mTLS")
    parser.add_argument("--tls-key", type=Path, help="client key for mTLS")
    parser.add_argument("--plugins", action="append", default=[], metavar="MODULE",
                        help="custom plugin modules to validate with (the sidecars must have them too)")
    parser.add_argument("--push-timeout", type=float, default=DEFAULTS.push_timeout_seconds,
                        help="seconds one push to one sidecar may take")
    parser.add_argument("--retry-delay", type=float, default=DEFAULTS.retry_delay_seconds,
                        help="seconds before a PluginChain with failed pushes is retried")
    parser.add_argument("--resync-interval", type=float, default=DEFAULTS.resync_interval_seconds,
                        help="seconds between checks that every sidecar still runs what it acknowledged")
    parser.add_argument("--liveness", default=None, metavar="URL", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    # Imported here so `pluginchain --help` and the sidecar's commands do not load kopf.
    import kopf

    from pluginchain import _logs as logs
    from pluginchain._config.registry import default_registry
    from pluginchain_operator import handlers  # noqa: F401  (importing registers the kopf handlers)
    from pluginchain_operator.controller import Controller
    from pluginchain_operator.pushing import PushCredentials

    logs.configure(args.log_level)
    controller = Controller(
        default_registry(args.plugins),
        PushCredentials(args.token_file, args.tls_ca, args.tls_cert, args.tls_key),
        push_timeout=args.push_timeout,
    )
    memo = kopf.Memo(controller=controller, retry_delay=args.retry_delay, resync_interval=args.resync_interval)
    asyncio.run(kopf.operator(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True,
        memo=memo,
        liveness_endpoint=args.liveness,
    ))
    return 0
