"""Helpers shared by several test folders: real processes (sidecar, Envoy, upstream, valkey, the
kmock cluster), scripted plugins, ext_proc messages. Test modules import from here, never from
each other."""
