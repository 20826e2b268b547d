"""The ``pluginchain`` command: check a chain file and show the plan it compiles to."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Sequence

from pluginchain.durations import format_duration
from pluginchain.engine import Plan, compile_plan
from pluginchain.registry import PluginRegistrationError, PluginRegistry, default_registry
from pluginchain.schema import ConfigError, load_file


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        registry = default_registry(args.plugins)
    except PluginRegistrationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return args.handler(args, registry)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pluginchain", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    validate = commands.add_parser("validate", help="check a chain file; print OK or every error")
    validate.set_defaults(handler=_validate)
    plan = commands.add_parser("plan", help="print the execution plan a chain file compiles to")
    plan.set_defaults(handler=_plan)
    for command in (validate, plan):
        command.add_argument("file", metavar="FILE", help="chain file (JSON, JSON with // comments, or YAML)")
        _add_plugins_option(command)
    return parser


def _add_plugins_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--plugins",
        metavar="MODULE",
        action="append",
        default=[],
        help="import custom plugins from MODULE (dotted name or .py path); repeatable",
    )


def _compile(path: str, registry: PluginRegistry) -> Plan:
    plan = compile_plan(load_file(path, registry), registry)
    return plan


def _validate(args: argparse.Namespace, registry: PluginRegistry) -> int:
    try:
        plan = _compile(args.file, registry)
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return 1
    asyncio.run(plan.aclose())
    print("OK")
    return 0


def _plan(args: argparse.Namespace, registry: PluginRegistry) -> int:
    try:
        plan = _compile(args.file, registry)
    except ConfigError as error:
        print(error.render(), file=sys.stderr)
        return 1
    print(render_plan(plan), end="")
    asyncio.run(plan.aclose())
    return 0


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
