#!/usr/bin/env bash
# Regenerate the nginx rules from the directory's registry; reload nginx only
# when they changed and `nginx -t` accepts them (otherwise keep the old file).
# Run by roomshard-nginx-rules.timer, and by hand after adding or removing a
# shard. Settings (environment, e.g. /etc/roomshard/nginx-rules.env):
#   ROOMSHARD_DIRECTORY_URL   internal URL of the directory (http://127.0.0.1:8080)
#   ROOMSHARD_ADMIN_TOKEN     admin token (GET /v1/admin/instances)
#   ROOMSHARD_SERVER_NAME     e.g. chat.example.com
#   ROOMSHARD_TLS_CERT / ROOMSHARD_TLS_KEY   certificate and key paths
#   ROOMSHARD_NGINX_LISTEN    default 443
#   ROOMSHARD_NGINX_DIR       default /etc/nginx/roomshard
#   NGINX_TEST                default "nginx -t -q";  NGINX_RELOAD default "systemctl reload nginx"
set -euo pipefail
: "${ROOMSHARD_DIRECTORY_URL:?set ROOMSHARD_DIRECTORY_URL}"
: "${ROOMSHARD_ADMIN_TOKEN:?set ROOMSHARD_ADMIN_TOKEN}"
dir="${ROOMSHARD_NGINX_DIR:-/etc/nginx/roomshard}"
roomshard="${ROOMSHARD_BIN:-roomshard}"
tls=()
if [ -n "${ROOMSHARD_TLS_CERT:-}" ]; then
  tls=(--ssl-certificate "$ROOMSHARD_TLS_CERT" --ssl-certificate-key "${ROOMSHARD_TLS_KEY:?set ROOMSHARD_TLS_KEY}")
fi
name=()
[ -z "${ROOMSHARD_SERVER_NAME:-}" ] || name=(--server-name "$ROOMSHARD_SERVER_NAME")

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
$roomshard rules --format nginx --from-directory "$ROOMSHARD_DIRECTORY_URL" \
  --listen "${ROOMSHARD_NGINX_LISTEN:-443}" --directory-upstream "$ROOMSHARD_DIRECTORY_URL" \
  "${name[@]}" "${tls[@]}" --out "$tmp" 2>/dev/null

mkdir -p "$dir"
if cmp -s "$tmp/roomshard.conf" "$dir/roomshard.conf"; then
  echo "roomshard nginx rules unchanged"
  exit 0
fi
[ ! -f "$dir/roomshard.conf" ] || cp -p "$dir/roomshard.conf" "$tmp/previous.conf"
install -m 0644 "$tmp/roomshard.conf" "$dir/roomshard.conf"
if ! ${NGINX_TEST:-nginx -t -q}; then
  if [ -f "$tmp/previous.conf" ]; then cp -p "$tmp/previous.conf" "$dir/roomshard.conf"; else rm -f "$dir/roomshard.conf"; fi
  echo "roomshard nginx rules: nginx -t refused the new rules; kept the previous file" >&2
  exit 1
fi
${NGINX_RELOAD:-systemctl reload nginx}
echo "roomshard nginx rules updated and nginx reloaded"
