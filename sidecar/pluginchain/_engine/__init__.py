"""The engine layer: compiles validated chains into plans and runs a request through them."""
