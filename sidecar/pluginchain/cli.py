"""The ``pluginchain`` command: check and plan chain files, serve them, run the local gateway."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from pluginchain import _logs as logs
from pluginchain._api.durations import format_duration
from pluginchain._config.defaults import DEFAULTS
from pluginchain._config.files import load_file
from pluginchain._config.issues import ConfigError
from pluginchain._config.registry import (
    PluginRegistrationError,
    PluginRegistry,
    default_registry,
)
from pluginchain._engine.plan import Plan, compile_plan
from pluginchain._sidecar.envoy_config import EnvoySettings
from pluginchain._sidecar.envoy_config import render as render_envoy
from pluginchain._sidecar.extproc import Limits
from pluginchain._sidecar.gateway import GatewayFailed, run_gateway
from pluginchain._sidecar.server import PortUnavailable, Sidecar, SidecarSettings, run_until_signalled


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except PluginRegistrationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pluginchain", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    validate = commands.add_parser("validate", help="check a chain file or PluginChain manifests; print OK or every error")
    validate.set_defaults(handler=_validate)
    plan = commands.add_parser("plan", help="print the execution plan a chain file (or each PluginChain) compiles to")
    plan.set_defaults(handler=_plan)
    for command in (validate, plan):
        command.add_argument(
            "file", metavar="FILE",
            help="chain file (JSON, JSON with // comments, or YAML), or Kubernetes manifests holding PluginChain "
            "resources (judged as the operator judges them; other kinds are skipped)",
        )
        _add_plugins_option(command)

    serve = commands.add_parser(
        "serve",
        help="run the ext_proc sidecar",
        description="Run the ext_proc sidecar. File mode (--config FILE): serve FILE's chains, reloaded "
        "on change and SIGHUP. Push mode (--config-port): the operator pushes chain sets to ConfigService; "
        "the chain file is not watched.",
    )
    serve.set_defaults(handler=_serve)
    _add_sidecar_options(serve, default_port=DEFAULTS.ext_proc_port, push_mode=True)
    _add_push_options(serve)

    gateway = commands.add_parser("gateway", help="run a real Envoy in front of the sidecar (local gateway)")
    gateway.set_defaults(handler=_gateway)
    _add_sidecar_options(gateway, default_port=0)
    gateway.add_argument("--upstream", required=True, metavar="URL", help="the LLM provider's base URL")
    _add_envoy_options(gateway)

    envoy_config = commands.add_parser("envoy-config", help="print the Envoy configuration the gateway runs")
    envoy_config.set_defaults(handler=_envoy_config, plugins=[])
    envoy_config.add_argument("--upstream", default="http://127.0.0.1:8000", metavar="URL")
    envoy_config.add_argument("--sidecar-port", type=int, default=DEFAULTS.ext_proc_port)
    envoy_config.add_argument("--max-body-bytes", type=int, default=DEFAULTS.max_body_bytes)
    envoy_config.add_argument("--max-streams", type=int, default=DEFAULTS.max_streams, metavar="N",
                              help=f"the sidecar's --max-streams, for Envoy's circuit breaker (default {DEFAULTS.max_streams})")
    _add_envoy_options(envoy_config)

    # The operator's modules (and kopf) load only when these commands run: a sidecar never needs them.
    operator = commands.add_parser("operator", help="run the Kubernetes operator that pushes PluginChains to sidecars")
    operator.set_defaults(handler=_operator)
    from pluginchain_operator.main import add_arguments as add_operator_arguments

    add_operator_arguments(operator)
    crd = commands.add_parser("crd", help="print the PluginChain CustomResourceDefinition")
    crd.set_defaults(handler=_crd)
    return parser


def _operator(args: argparse.Namespace) -> int:
    from pluginchain_operator.main import run

    return run(args)


def _crd(args: argparse.Namespace) -> int:
    from pluginchain_operator.crd import HEADER, render_crd

    print(HEADER + yaml.safe_dump(render_crd(), sort_keys=False, width=120), end="")
    return 0


def _add_sidecar_options(command: argparse.ArgumentParser, default_port: int, push_mode: bool = False) -> None:
    if push_mode:
        command.add_argument(
            "--config", metavar="FILE",
            help="chain file; reloaded on change and SIGHUP. With --config-port: optional, not watched, "
            "only the starting plan when the state file holds none",
        )
    else:
        command.add_argument("--config", required=True, metavar="FILE", help="chain file; reloaded on change and SIGHUP")
    _add_plugins_option(command)
    command.add_argument("--host", default=DEFAULTS.ext_proc_host, help=f"ext_proc listen address (default {DEFAULTS.ext_proc_host})")
    command.add_argument("--sidecar-port", dest="sidecar_port", type=int, default=default_port,
                         help=f"ext_proc gRPC port (default {default_port or 'a free one'})")
    command.add_argument("--metrics-port", type=int, default=DEFAULTS.metrics_port,
                         help=f"Prometheus /metrics port; -1 disables (default {DEFAULTS.metrics_port})")
    command.add_argument("--max-body-bytes", type=int, default=DEFAULTS.max_body_bytes,
                         help=f"largest body the chain accepts; larger gets 413 (default {DEFAULTS.max_body_bytes})")
    command.add_argument("--max-streams", type=int, default=DEFAULTS.max_streams, metavar="N",
                         help="concurrent ext_proc streams (requests in the chain) served; one more is refused at once "
                         f"with RESOURCE_EXHAUSTED, Envoy answers it 500 (default {DEFAULTS.max_streams})")
    command.add_argument("--grace", type=float, default=DEFAULTS.grace_seconds,
                         help=f"seconds in-flight requests get on SIGTERM (default {DEFAULTS.grace_seconds:g})")
    command.add_argument("--reload-settle", type=float, default=DEFAULTS.reload_settle_seconds, metavar="SECONDS",
                         help="a changed chain file is served once it stayed the same this long (read twice, same "
                         f"bytes, size and mtime), so a half-written file is never served (default {DEFAULTS.reload_settle_seconds:g})")
    command.add_argument("--log-level", default="info", choices=logs.LEVELS, help="least severe level logged (default info)")


def _add_push_options(command: argparse.ArgumentParser) -> None:
    push = command.add_argument_group(
        "push mode (ConfigService)",
        "With --config-port the operator pushes chain sets over gRPC, authenticated by a bearer token; "
        "the chain-file watcher is off and SIGHUP reloads nothing. The sidecar starts from the state file "
        "if it holds a valid plan, else from --config, else with no chains (every request gets 500 until "
        "a push: fail closed).",
    )
    push.add_argument("--config-port", type=int, metavar="PORT",
                      help=f"serve ConfigService (and gRPC health) on PORT, e.g. {DEFAULTS.config_port}; 0 picks a free one")
    push.add_argument("--config-host", default=DEFAULTS.config_host, metavar="HOST",
                      help=f"ConfigService listen address (default {DEFAULTS.config_host}: the operator calls from outside the pod)")
    push.add_argument("--token-file", type=Path, metavar="FILE",
                      help="file holding the bearer token every push must carry (a mounted Secret); re-read when it "
                      "changes; required with --config-port")
    push.add_argument("--state-file", type=Path, metavar="FILE",
                      help="where the last applied chain set is kept (mode 0600), to resume it after a restart")
    push.add_argument("--tls-cert", type=Path, metavar="FILE", help="PEM certificate for ConfigService (TLS)")
    push.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    push.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                      help="PEM CA; ConfigService then requires a client certificate signed by it (mTLS)")


def _add_envoy_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--port", type=int, default=DEFAULTS.envoy_port, help=f"Envoy listener port (default {DEFAULTS.envoy_port})")
    command.add_argument("--admin-port", type=int, default=DEFAULTS.envoy_admin_port,
                         help=f"Envoy admin port, on loopback (default {DEFAULTS.envoy_admin_port})")
    command.add_argument("--ready-port", type=int, default=None, metavar="PORT",
                         help="also answer GET /ready on PORT of the listener's address, for probes that cannot "
                         "reach the admin port on loopback (the kubelet's); default: no such listener")
    command.add_argument("--route", action="append", default=[], metavar="PREFIX=CHAIN",
                         help="run CHAIN for paths starting with PREFIX; repeatable; others run 'default'")
    command.add_argument("--message-timeout", default=DEFAULTS.message_timeout,
                         help=f"Envoy's wait for each sidecar answer (default {DEFAULTS.message_timeout})")
    command.add_argument("--upstream-timeout", "--route-timeout", dest="upstream_timeout", default=DEFAULTS.upstream_timeout, metavar="DURATION",
                         help="Envoy's route timeout: how long one LLM call may take, from the end of the request to the end of "
                         f"the response, streams included; 0s: no limit (default {DEFAULTS.upstream_timeout})")


def _add_plugins_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--plugins",
        metavar="MODULE",
        action="append",
        default=[],
        help="import custom plugins from MODULE: a .py path, or a dotted name found on the Python path or else in "
        "the working directory (no PYTHONPATH needed); repeatable",
    )


def _compile(path: str, registry: PluginRegistry) -> Plan:
    return compile_plan(load_file(path, registry), registry)


def _sidecar_settings(args: argparse.Namespace) -> SidecarSettings:
    push = {}
    if hasattr(args, "config_port"):  # `serve` only; the local gateway always runs a chain file
        push = {
            "config_host": args.config_host,
            "config_port": args.config_port,
            "token_file": args.token_file,
            "state_file": args.state_file,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "tls_client_ca": args.tls_client_ca,
        }
    return SidecarSettings(
        config=Path(args.config) if args.config is not None else None,
        plugin_modules=tuple(args.plugins),
        host=args.host,
        port=args.sidecar_port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        limits=Limits(max_body_bytes=args.max_body_bytes),
        max_streams=args.max_streams,
        grace=args.grace,
        reload_settle=args.reload_settle,
        **push,
    )


def _envoy_settings(args: argparse.Namespace, sidecar_port: int) -> EnvoySettings:
    routes = []
    for route in args.route:
        prefix, separator, chain = route.partition("=")
        if not separator or not prefix.startswith("/") or not chain:
            raise SystemExit(f"error: --route must look like /prefix=chain, got {route!r}")
        routes.append((prefix, chain))
    return EnvoySettings(
        upstream=args.upstream,
        listen_port=args.port,
        admin_port=args.admin_port,
        ready_port=args.ready_port,
        sidecar_port=sidecar_port,
        routes=tuple(routes),
        max_body_bytes=args.max_body_bytes,
        message_timeout=args.message_timeout,
        upstream_timeout=args.upstream_timeout,
        max_streams=args.max_streams,
    )


def _check_routes(config: str, plugin_modules: Sequence[str], routes: Sequence[tuple[str, str]]) -> None:
    """Raise ValueError naming each ``--route`` whose chain the chain file does not define: every
    request on it would get 500 unknown_chain. (The file's own checks, its default chain among
    them, are the sidecar's: a ConfigError here says the same.)"""
    chains = load_file(config, default_registry(plugin_modules))
    unknown = [f"--route {prefix}={chain}" for prefix, chain in routes if chain not in chains]
    if unknown:
        defined = ", ".join(sorted(chains))
        raise ValueError(
            f"{'; '.join(unknown)}: {config} defines no such chain (chains defined: {defined}), so every request "
            "on the route would get 500 unknown_chain"
        )


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = _sidecar_settings(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logs.configure(args.log_level)
    try:
        sidecar = Sidecar(settings)
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_until_signalled(sidecar))
    except PortUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _gateway(args: argparse.Namespace) -> int:
    logs.configure(args.log_level)
    try:
        envoy = _envoy_settings(args, args.sidecar_port)
        render_envoy(envoy)
        _check_routes(args.config, args.plugins, envoy.routes)
        asyncio.run(run_gateway(_sidecar_settings(args), envoy))
    except (ConfigError, ValueError, GatewayFailed, PortUnavailable) as error:
        print(error.render() if isinstance(error, ConfigError) else f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _envoy_config(args: argparse.Namespace) -> int:
    try:
        config = render_envoy(_envoy_settings(args, args.sidecar_port))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(yaml.safe_dump(config, sort_keys=False), end="")
    return 0


def _validate(args: argparse.Namespace) -> int:
    plans = _load_or_report(args)
    if plans is None:
        return 1
    asyncio.run(_close(plans))
    print("OK")
    return 0


def _plan(args: argparse.Namespace) -> int:
    plans = _load_or_report(args)
    if plans is None:
        return 1
    for resource, plan in plans.items():
        if resource:
            print(f"# {resource}")
        print(render_plan(plan), end="")
    asyncio.run(_close(plans))
    return 0


async def _close(plans: dict[str, Plan]) -> None:
    for plan in plans.values():
        await plan.aclose()


def _load_or_report(args: argparse.Namespace) -> dict[str, Plan] | None:
    """The compiled plans of ``args.file``: a chain file's (under ""), or each PluginChain's in a
    file of Kubernetes manifests (under "PluginChain NAME"); None after printing every error."""
    from pluginchain_operator.resources import manifest_chains

    registry = default_registry(args.plugins)
    try:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            manifests = None  # load_file reports it
        else:
            manifests = manifest_chains(text, args.file, registry)
        if manifests is None:
            return {"": _compile(args.file, registry)}
        return {resource: compile_plan(chains, registry) for resource, chains in manifests.items()}
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return None


def render_plan(plan: Plan) -> str:
    """The plan as people read it: per chain and stage, groups in order with their members."""
    lines: list[str] = []
    for chain in plan.chains.values():
        lines.append(f"chain {chain.name}")
        lines.append(f"  phases: {', '.join(chain.phases.names()) or 'none'}")
        for stage, groups in chain.stages.items():
            if not groups:
                lines.append(f"  {stage}: no plugins")
                continue
            lines.append(f"  {stage}:")
            for group in groups:
                lines.append(f"    priority {group.priority}:")
                members = [(p, "sequential") for p in group.sequential] + [(p, "parallel") for p in group.parallel]
                width = max(len(p.id) for p, _ in members)
                for plugin, mode in members:
                    settings = plugin.settings
                    name = f" ({plugin.name})" if plugin.name != plugin.id else ""
                    lines.append(
                        f"      {plugin.id:<{width}}  {mode:<10}  timeout={format_duration(settings.timeout)}"
                        f"  on_error={settings.on_error}{name}"
                    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
