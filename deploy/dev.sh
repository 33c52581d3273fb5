#!/usr/bin/env bash
# Runs the gateway in front of a working backend on this machine, for trying
# it by hand: builds the release binaries, makes a development certificate,
# starts the reference echo backend and the gateway. Ctrl-C stops both.
#
#   deploy/dev.sh                 # wss on 8443, ws on 8080, admin on 9090
#   WSS_PORT=9443 deploy/dev.sh   # other ports: WSS_PORT, WS_PORT, ADMIN_PORT, BACKEND_PORT
#   MODE=push deploy/dev.sh       # the backend also pushes 1 msg/s to every session
set -euo pipefail
cd "$(dirname "$0")/.."
WSS_PORT=${WSS_PORT:-8443}
WS_PORT=${WS_PORT:-8080}
ADMIN_PORT=${ADMIN_PORT:-9090}
BACKEND_PORT=${BACKEND_PORT:-9000}
MODE=${MODE:-echo}

cargo build --release --bins
certs=target/devcert
[ -f "$certs/cert.pem" ] || target/release/loadtest devcert --out "$certs"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

target/release/loadtest backend --listen "127.0.0.1:$BACKEND_PORT" --mode "$MODE" --push-rate 1 &
pids+=($!)
target/release/gateway \
  --listen-tls "127.0.0.1:$WSS_PORT" --tls-cert "$certs/cert.pem" --tls-key "$certs/key.pem" \
  --listen "127.0.0.1:$WS_PORT" \
  --admin "127.0.0.1:$ADMIN_PORT" \
  --backend "127.0.0.1:$BACKEND_PORT" --links 2 &
pids+=($!)

sleep 1
cat <<TXT

Gateway running in front of the reference $MODE backend.
  wss://localhost:$WSS_PORT/ws   (trust $certs/ca.pem)
  ws://127.0.0.1:$WS_PORT/ws
  http://127.0.0.1:$ADMIN_PORT/readyz  /metrics
Try it (after tests/run.sh or: python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt):
  .venv/bin/python tests/interop/ws_client.py wss://localhost:$WSS_PORT/ws --ca $certs/ca.pem
  SSL_CERT_FILE=$certs/ca.pem .venv/bin/python -m websockets wss://localhost:$WSS_PORT/ws   # interactive
Ctrl-C stops everything.
TXT
wait
