#!/usr/bin/env sh
# Certificates for compose.yaml's cluster, into cluster/certs/ (kept out of git): a CA, one
# certificate the three nodes share (clients and routes; it names nats-1..3 and localhost)
# and one that Veil's processes present as clients. For a real deployment use your own CA
# and a certificate per node; cluster/cluster.conf only needs the three file paths.
set -eu
out="$(dirname "$0")/certs"
mkdir -p "$out"
cd "$out"
days=825

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=Veil NATS CA" -keyout ca-key.pem -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

issue() { # name, extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
    -keyout "$1-key.pem" -out "$1.csr"
  printf '%s\n' "$2" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days "$days" \
    -extfile "$1.ext" -out "$1.pem"
  rm "$1.csr" "$1.ext"
}
issue node "basicConstraints=CA:FALSE
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=DNS:nats-1,DNS:nats-2,DNS:nats-3,DNS:localhost,IP:127.0.0.1"
issue client "basicConstraints=CA:FALSE
extendedKeyUsage=clientAuth"
chmod 600 ./*-key.pem
echo "certificates in $out (keep ca-key.pem somewhere safe)"
