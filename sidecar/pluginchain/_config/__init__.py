"""The config layer: chain models, validation with located errors, plugin registration, and the
wire form pushes carry. No gRPC server, Kubernetes or metrics here: the operator, the CLI and the
sidecar all validate with it."""
