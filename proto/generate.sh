#!/usr/bin/env bash
# Regenerates engine/pb from proto/ with the pinned grpcio-tools (see pyproject's dev extra).
# Usage: proto/generate.sh [OUTDIR]   (default: engine/pb)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-engine/pb}"
python="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
"$python" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" proto/event.proto
