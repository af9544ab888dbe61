#!/usr/bin/env bash
# Write a private CA and the meshxl webhook's serving certificate into certs/ (next to
# this script) for the self-signed overlay. Needs openssl. Re-run to renew (the
# certificate is valid for 730 days), then re-apply the overlay.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/certs"
namespace="${MESHXL_NAMESPACE:-meshxl-system}"
service="meshxl-webhook"
days="${MESHXL_CERT_DAYS:-730}"
command -v openssl >/dev/null || { echo "make-certs.sh needs openssl (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/ca.key"
openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days "$days" \
  -subj "/CN=meshxl-webhook-ca" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$dir/ca.crt"

openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/tls.key"
openssl req -new -key "$tmp/tls.key" -subj "/CN=$service.$namespace.svc" -out "$tmp/tls.csr"
cat > "$tmp/ext.cnf" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:$service.$namespace.svc,DNS:$service.$namespace.svc.cluster.local
EXT
openssl x509 -req -in "$tmp/tls.csr" -CA "$dir/ca.crt" -CAkey "$tmp/ca.key" \
  -CAcreateserial -sha256 -days "$days" -extfile "$tmp/ext.cnf" -out "$dir/tls.crt" 2>/dev/null
# The CA's key is not kept: renewing means a new CA, and re-applying updates both the
# Secret and the caBundle together.
cp "$tmp/tls.key" "$dir/tls.key"
echo "wrote $dir/ca.crt, $dir/tls.crt, $dir/tls.key (valid $days days)"
