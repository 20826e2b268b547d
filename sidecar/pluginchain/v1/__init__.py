"""Generated code of proto/pluginchain/v1; regenerate with scripts/gen_protos.sh."""
