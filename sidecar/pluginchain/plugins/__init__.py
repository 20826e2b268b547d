"""Built-in plugins; each registers through the pluginchain.plugins entry-point group like any custom plugin."""
