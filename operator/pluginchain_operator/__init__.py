"""The pluginchain operator: turns PluginChain resources into plans pushed into gateway sidecars.

Imported as ``pluginchain_operator``: the standard library owns the name ``operator``.
"""
