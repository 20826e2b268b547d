"""The plugin API layer: what :mod:`pluginchain` re-exports to plugin authors. Import from there."""
