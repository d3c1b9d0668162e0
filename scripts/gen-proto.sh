#!/bin/sh
# Regenerate the snapshotter's Python gRPC modules from its .proto (`make proto`).
# Needs grpcio-tools (in the test extra); the output is committed, so installing lamina
# never needs it. Paths are given from src/ so the generated imports are absolute
# (lamina.snapshotter.proto.snapshots_pb2), as a package needs them.
set -eu
cd "$(dirname "$0")/../src"
PY=${PY:-../.venv/bin/python}
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
    lamina/snapshotter/proto/snapshots.proto
