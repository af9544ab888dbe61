#!/usr/bin/env bash
# Write a private CA and the meshxl webhook's serving certificate into certs/ (next to
# this script) for the self-signed overlay, and etcd's certificates into certs/etcd/:
# a CA of its own, etcd's serving and peer certificates, the client certificate of
# meshxl's pods and the statesync sidecars' one (docs/kubernetes.md, "etcd TLS").
# Needs openssl. Re-run to renew (the certificates are valid for 730 days), then
# re-apply the overlay. etcd's CA (valid 10 years) is kept in certs/etcd/ca.key and
# reused, so renewed certificates stay trusted everywhere, the sidecars' namespaces
# included; delete certs/etcd/ to start over with a new CA.
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

# -- etcd -------------------------------------------------------------------------------
etcd="$dir/etcd"
mkdir -p "$etcd"
if [[ ! -s "$etcd/ca.key" || ! -s "$etcd/ca.crt" ]]; then
  openssl ecparam -name prime256v1 -genkey -noout -out "$etcd/ca.key"
  openssl req -x509 -new -key "$etcd/ca.key" -sha256 -days 3650 \
    -subj "/CN=meshxl-etcd-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$etcd/ca.crt"
fi

# issue NAME COMMON_NAME EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
issue() {
  local name="$1" cn="$2" eku="$3" san="${4:-}"
  openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/$name.key"
  openssl req -new -key "$tmp/$name.key" -subj "/CN=$cn" -out "$tmp/$name.csr"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [[ -n "$san" ]] && echo "subjectAltName=$san"
  } > "$tmp/$name.cnf"
  openssl x509 -req -in "$tmp/$name.csr" -CA "$etcd/ca.crt" -CAkey "$etcd/ca.key" \
    -CAcreateserial -CAserial "$tmp/etcd-ca.srl" -sha256 -days "$days" \
    -extfile "$tmp/$name.cnf" -out "$etcd/$name.crt" 2>/dev/null
  cp "$tmp/$name.key" "$etcd/$name.key"
}
peers="DNS:*.meshxl-etcd-peer.$namespace.svc,DNS:*.meshxl-etcd-peer.$namespace.svc.cluster.local"
# Client auth too: etcd dials its own gRPC gateway with its serving certificate.
issue server meshxl-etcd serverAuth,clientAuth \
  "DNS:meshxl-etcd,DNS:meshxl-etcd.$namespace,DNS:meshxl-etcd.$namespace.svc,DNS:meshxl-etcd.$namespace.svc.cluster.local,$peers,DNS:localhost"
issue peer meshxl-etcd-peer serverAuth,clientAuth "$peers"
issue system meshxl-system clientAuth
issue statesync meshxl-statesync clientAuth
echo "wrote $etcd/{ca,server,peer,system,statesync}.crt and keys (valid $days days; CA kept)"
