#!/usr/bin/env bash
# Keep /etc/nginx/roomshard/roomshard.conf equal to the directory's registry: runs
# `roomshard rules --format nginx --watch`, which rewrites the file within a second of a
# change, runs `nginx -t` (a refused file is put back) and reloads nginx. Run by
# roomshard-nginx-rules.service. Extra arguments are passed on (e.g. --interval 2).
# Settings (environment, e.g. /etc/roomshard/nginx-rules.env):
#   ROOMSHARD_DIRECTORY_URL   internal URL of the directory (http://127.0.0.1:8080)
#   ROOMSHARD_ADMIN_TOKEN     admin token (GET /v1/admin/instances)
#   ROOMSHARD_SERVER_NAME     e.g. chat.example.com
#   ROOMSHARD_TLS_CERT / ROOMSHARD_TLS_KEY   certificate and key paths
#   ROOMSHARD_NGINX_LISTEN    default 443
#   ROOMSHARD_NGINX_DIR       default /etc/nginx/roomshard
#   ROOMSHARD_RULES_METRICS   Prometheus metrics address, default 127.0.0.1:9109
#   NGINX_TEST                default "nginx -t -q";  NGINX_RELOAD default "systemctl reload nginx"
set -euo pipefail
: "${ROOMSHARD_DIRECTORY_URL:?set ROOMSHARD_DIRECTORY_URL}"
: "${ROOMSHARD_ADMIN_TOKEN:?set ROOMSHARD_ADMIN_TOKEN}"
dir="${ROOMSHARD_NGINX_DIR:-/etc/nginx/roomshard}"
tls=()
if [ -n "${ROOMSHARD_TLS_CERT:-}" ]; then
  tls=(--ssl-certificate "$ROOMSHARD_TLS_CERT" --ssl-certificate-key "${ROOMSHARD_TLS_KEY:?set ROOMSHARD_TLS_KEY}")
fi
name=()
[ -z "${ROOMSHARD_SERVER_NAME:-}" ] || name=(--server-name "$ROOMSHARD_SERVER_NAME")

mkdir -p "$dir"
exec ${ROOMSHARD_BIN:-roomshard} rules --format nginx --watch \
  --from-directory "$ROOMSHARD_DIRECTORY_URL" --out "$dir/roomshard.conf" \
  --listen "${ROOMSHARD_NGINX_LISTEN:-443}" --directory-upstream "$ROOMSHARD_DIRECTORY_URL" \
  "${name[@]}" "${tls[@]}" \
  --check-cmd "${NGINX_TEST:-nginx -t -q}" --reload-cmd "${NGINX_RELOAD:-systemctl reload nginx}" \
  --metrics-listen "${ROOMSHARD_RULES_METRICS:-127.0.0.1:9109}" "$@"
