#!/usr/bin/env bash
# Usage: make-certs.sh [NAMESPACE...]
#
# Write a private CA and the meshxl webhook's serving certificate into certs/ (next to
# this script) for the self-signed overlay, etcd's certificates into certs/etcd/: a CA
# of its own, etcd's serving and peer certificates, the client certificates of meshxl's
# pods and of etcd's root user (the Job meshxl-etcd-setup), and each cluster's statesync
# sidecars' one (certs/etcd/cluster-CLUSTER.crt, common name meshxl-cluster-CLUSTER: that
# cluster's etcd user; docs/kubernetes.md, "etcd TLS"), and the
# control plane's into certs/xds/: a third CA, the control plane's serving certificate
# and, for each NAMESPACE given, the client certificate of the Envoys injected there
# (certs/xds/envoy-NAMESPACE.crt: the SPIFFE ID
# spiffe://$MESHXL_TRUST_DOMAIN/ns/NAMESPACE/meshxl-envoy, which lets it speak for the
# node ids POD.NAMESPACE; docs/kubernetes.md, "xDS mutual TLS").
#
# MESHXL_ETCD_CLUSTERS="orders cart" (names separated by spaces or commas; default
# orders, the cluster of base/model.yaml): the clusters, pools and virtual systems of
# your model, each of which gets its sidecars' certificate.
#
# MESHXL_ETCD_SHARDS="s1 s2" (names separated by spaces or commas; none by default)
# also issues, from etcd's CA, the serving and peer certificates of the session shards'
# etcd clusters meshxl-etcd-SHARD (components/session-shards), shaped as the main
# cluster's, into session-shards/certs/etcd/ next to this script (SHARD-server.crt,
# SHARD-peer.crt, their keys and a copy of etcd's ca.crt), where the component
# session-shards/ turns them into the Secrets meshxl-etcd-SHARD-server-tls and
# meshxl-etcd-SHARD-peer-tls (kustomize reads only files under a component's own
# directory). Name the shards on every run: a run without them leaves their
# certificates as they are (docs/kubernetes.md, "Session shards").
# Needs openssl. Re-run to renew (the certificates are valid for 730 days), then
# re-apply the overlay. etcd's and the control plane's CAs (valid 10 years) are kept in
# certs/etcd/ca.key and certs/xds/ca.key and reused, so renewed certificates stay
# trusted everywhere, the application namespaces included; delete certs/etcd/ or
# certs/xds/ to start over with a new CA.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/certs"
namespace="${MESHXL_NAMESPACE:-meshxl-system}"
service="meshxl-webhook"
days="${MESHXL_CERT_DAYS:-730}"
trust_domain="${MESHXL_TRUST_DOMAIN:-cluster.local}"
for ns in "$@"; do
  [[ "$ns" =~ ^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || {
    echo "make-certs.sh: '$ns' is not a Kubernetes namespace name" >&2; exit 2; }
done
clusters_list="${MESHXL_ETCD_CLUSTERS:-orders}"
read -r -a clusters <<< "${clusters_list//,/ }"
for cluster in "${clusters[@]}"; do
  # A Secret name once prefixed (meshxl-etcd-CLUSTER): a cluster name without '_'.
  [[ "$cluster" =~ ^[a-z0-9]([-.a-z0-9]{0,200}[a-z0-9])?$ ]] || {
    echo "make-certs.sh: '$cluster' is not a cluster name that names a Secret (MESHXL_ETCD_CLUSTERS: lowercase letters, digits, '.' and '-')" >&2; exit 2; }
done
shards_list="${MESHXL_ETCD_SHARDS:-}"
read -r -a shards <<< "${shards_list//,/ }"
for shard in "${shards[@]}"; do
  # A shard's name as meshxl accepts it (meshxl/etcd/shards.py, NAME).
  [[ "$shard" =~ ^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$ ]] || {
    echo "make-certs.sh: '$shard' is not a shard name (MESHXL_ETCD_SHARDS: lowercase letters, digits and '-', 1-32 characters)" >&2; exit 2; }
done
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

# issue NAME COMMON_NAME EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES [CA_DIRECTORY [OUT]]]
# writes OUT/NAME.crt and OUT/NAME.key (OUT: the CA's directory unless given)
issue() {
  local name="$1" cn="$2" eku="$3" san="${4:-}" ca="${5:-$etcd}" out="${6:-${5:-$etcd}}"
  openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/$name.key"
  openssl req -new -key "$tmp/$name.key" -subj "/CN=$cn" -out "$tmp/$name.csr"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [[ -n "$san" ]] && echo "subjectAltName=$san"
  } > "$tmp/$name.cnf"
  openssl x509 -req -in "$tmp/$name.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" \
    -CAcreateserial -CAserial "$tmp/$(basename "$ca")-ca.srl" -sha256 -days "$days" \
    -extfile "$tmp/$name.cnf" -out "$out/$name.crt" 2>/dev/null
  cp "$tmp/$name.key" "$out/$name.key"
}

# ca DIRECTORY COMMON_NAME: a CA kept in DIRECTORY/ca.{crt,key} (made once, reused)
ca() {
  local directory="$1" cn="$2"
  mkdir -p "$directory"
  if [[ ! -s "$directory/ca.key" || ! -s "$directory/ca.crt" ]]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$directory/ca.key"
    openssl req -x509 -new -key "$directory/ca.key" -sha256 -days 3650 \
      -subj "/CN=$cn" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -out "$directory/ca.crt"
  fi
}
# cluster NAME OUT PREFIX: the serving and peer certificates of the etcd cluster NAME
# (StatefulSet NAME, headless Service NAME-peer), OUT/PREFIXserver.crt and
# OUT/PREFIXpeer.crt, from etcd's CA.
cluster() {
  local name="$1" out="$2" prefix="$3"
  local peers="DNS:*.$name-peer.$namespace.svc,DNS:*.$name-peer.$namespace.svc.cluster.local"
  # Client auth too: etcd dials its own gRPC gateway with its serving certificate.
  issue "${prefix}server" "$name" serverAuth,clientAuth \
    "DNS:$name,DNS:$name.$namespace,DNS:$name.$namespace.svc,DNS:$name.$namespace.svc.cluster.local,$peers,DNS:localhost" \
    "$etcd" "$out"
  # The members' certificate between them: etcd's --peer-cert-allowed-cn is NAME-peer,
  # so a member of another cluster (same CA) cannot join this one.
  issue "${prefix}peer" "$name-peer" serverAuth,clientAuth "$peers" "$etcd" "$out"
}
ca "$etcd" meshxl-etcd-ca
cluster meshxl-etcd "$etcd" ""
issue system meshxl-system clientAuth
issue root root clientAuth
for cluster in "${clusters[@]}"; do
  issue "cluster-$cluster" "meshxl-cluster-$cluster" clientAuth
done
echo "wrote $etcd/{ca,server,peer,system,root}.crt, cluster-{${clusters[*]}}.crt and keys (valid $days days; CA kept)"

# -- the session shards' etcd clusters (MESHXL_ETCD_SHARDS) --------------------------------
if (( ${#shards[@]} )); then
  sharded="$(dirname "$dir")/session-shards/certs/etcd"
  mkdir -p "$sharded"
  cp "$etcd/ca.crt" "$sharded/ca.crt"
  for shard in "${shards[@]}"; do
    cluster "meshxl-etcd-$shard" "$sharded" "$shard-"
  done
  echo "wrote $sharded/{ca,SHARD-server,SHARD-peer}.crt and keys for shards: ${shards[*]} (valid $days days)"
fi

# -- the control plane (ADS over mutual TLS) ---------------------------------------------
xds="$dir/xds"
ca "$xds" meshxl-xds-ca
issue server "meshxl-xds.$namespace.svc" serverAuth \
  "DNS:meshxl-xds.$namespace.svc,DNS:meshxl-xds.$namespace.svc.cluster.local" "$xds"
for ns in "$@"; do
  issue "envoy-$ns" "meshxl-envoy.$ns" clientAuth \
    "URI:spiffe://$trust_domain/ns/$ns/meshxl-envoy" "$xds"
done
echo "wrote $xds/{ca,server}.crt and keys${*:+, Envoy certificates for: $*} (valid $days days; CA kept)"
