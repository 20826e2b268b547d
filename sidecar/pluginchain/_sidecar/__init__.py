"""The sidecar layer: answers Envoy's ext_proc streams, takes the operator's pushes, watches the
chain file, serves health and metrics, and runs the local gateway."""
