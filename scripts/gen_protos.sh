#!/usr/bin/env bash
# Regenerates the Python code of proto/ (committed under sidecar/) with the pinned grpcio-tools,
# so every machine produces the same bytes and tests/sidecar/test_generated_code.py can catch drift.
#
#   scripts/gen_protos.sh            # rewrite sidecar/pluginchain/v1/*_pb2*.py*
#   scripts/gen_protos.sh OUT_DIR    # write the tree under OUT_DIR instead (the drift test does this)
#
# Needs `make install` first (it uses .venv/bin/python); PYTHON=... picks another interpreter.
set -euo pipefail

GRPCIO_TOOLS_VERSION="1.85.1"  # keep in step with the pin in pyproject.toml's test extras

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
out="$(mkdir -p "${1:-$root/sidecar}" && cd "${1:-$root/sidecar}" && pwd)"

if [[ ! -x "$python" ]]; then
    echo "gen_protos.sh: $python not found; run 'make install' first (or set PYTHON)" >&2
    exit 1
fi
found="$("$python" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null || echo none)"
if [[ "$found" != "$GRPCIO_TOOLS_VERSION" ]]; then
    # Another protoc writes different bytes (and another GRPC_GENERATED_VERSION): refuse rather
    # than produce code the drift test would then reject.
    echo "gen_protos.sh: needs grpcio-tools==$GRPCIO_TOOLS_VERSION, found $found in $python; run 'make install'" >&2
    exit 1
fi

cd "$root"
mapfile -t protos < <(find proto -name '*.proto' | LC_ALL=C sort)
if [[ ${#protos[@]} -eq 0 ]]; then
    echo "gen_protos.sh: no .proto files under $root/proto" >&2
    exit 1
fi

# Remove what an earlier run generated, so code of a deleted .proto does not linger. Only
# generated names are touched; the hand-written package around them stays.
for proto in "${protos[@]}"; do
    dir="$out/$(dirname "${proto#proto/}")"
    [[ -d "$dir" ]] && find "$dir" -maxdepth 1 -type f \( -name '*_pb2.py' -o -name '*_pb2.pyi' -o -name '*_pb2_grpc.py' \) -delete
done

"$python" -m grpc_tools.protoc -I proto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    "${protos[@]}"

echo "generated ${protos[*]} into $out"
