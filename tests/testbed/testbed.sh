#!/usr/bin/env bash
# The Kubernetes test bed: a real etcd, kube-apiserver and kube-controller-manager (v1.20.2) on 127.0.0.1, and the
# project's test kubelet, for the tests and for trying things by hand.
#
#   tests/testbed/testbed.sh up      build or reuse the binaries, start everything, write $TESTBED_DIR/kubeconfig
#   tests/testbed/testbed.sh down    stop every process `up` started (by recorded PID) and remove the data
#   tests/testbed/testbed.sh crd-up  also start an apiextensions-apiserver 1.36.4 (CRDs only, CEL rules validated) on
#                                    the bed's etcd, authenticating and authorizing through the bed; writes
#                                    $TESTBED_DIR/kubeconfig-crd (`up` does this too)
#   tests/testbed/testbed.sh crd-down stop only that server
#   tests/testbed/testbed.sh restart NAME  stop one component (kube-apiserver, etcd, ...) and start it again
#   tests/testbed/testbed.sh status  whether it runs, and how to use it (kubectl v1.20.2 and helm 3.17.2 from the cache)
#
# TESTBED_POD_SUBNET (default 127.0.0) gives pods <subnet>.2-254; a second bed on the machine needs another one.
# TESTBED_DIR (default: target/testbed of the checkout) holds the PKI, logs, PIDs, etcd's throw-away data and the
# admin kubeconfig. The binaries are cached by version under TESTBED_CACHE (/var/cache/distcache/testbed) by
# build-kube.sh, so a warm `up` takes seconds. Ports are free ones chosen at `up`.
#
# What it does not emulate: no scheduler (the test kubelet binds the pods it runs), no Service VIPs or kube-proxy,
# no cluster DNS, no container isolation (pods are processes on 127.0.0.x). See tests/testbed/README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TESTBED_DIR=${TESTBED_DIR:-$ROOT/target/testbed}
TESTBED_CACHE=${TESTBED_CACHE:-/var/cache/distcache/testbed}
KUBE_BIN=$TESTBED_CACHE/kubernetes-v1.20.2/bin
HELM_BIN=$TESTBED_CACHE/helm-v3.17.2
APIEXT_BIN=$TESTBED_CACHE/apiextensions-1.36.4/bin/apiextensions-apiserver
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
KUBELET_BIN=${TESTBED_KUBELET:-$TARGET/debug/distcache-test-kubelet}

log() { printf '==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

free_ports() {
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
' "$1"
}

# wait_for SECONDS WHAT COMMAND...: polls COMMAND every 200 ms until it succeeds or SECONDS pass.
wait_for() {
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
  log "$what"
}

start() {
  local name=$1
  shift
  # The command is kept so that `restart NAME` can run it again (same ports, same data).
  printf '%q ' "$@" >"$TESTBED_DIR/cmd.$name"
  setsid "$@" >>"$TESTBED_DIR/$name.log" 2>&1 </dev/null &
  echo "$! $name" >>"$TESTBED_DIR/pids"
}

# stop_component PID NAME: SIGTERM, up to 10 s to exit, then SIGKILL; only while PID is still the process that was
# started as NAME (a recycled PID runs something else, which is left alone).
stop_component() {
  local pid=$1 name=$2 binary=$2
  [[ $name == test-kubelet ]] && binary=distcache-test-kubelet
  kill -0 "$pid" 2>/dev/null || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$binary" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
  log "stopped $name (pid $pid)"
}

# restart NAME: stops one component (SIGTERM, then SIGKILL) and starts it again with the same command line, as
# an outage of that component; used by tests of what survives an API-server restart.
restart() {
  local name=$1 pid
  [[ -f $TESTBED_DIR/cmd.$name ]] || die "no component $name in $TESTBED_DIR"
  pid=$(awk -v n="$name" '$2 == n {print $1}' "$TESTBED_DIR/pids" | tail -n1)
  [[ -n $pid ]] && stop_component "$pid" "$name"
  sed -i "/ $name\$/d" "$TESTBED_DIR/pids"
  log "stopped $name for a restart"
  local cmd
  cmd=$(cat "$TESTBED_DIR/cmd.$name")
  eval "start $name $cmd"
  if [[ $name == kube-apiserver ]]; then
    # shellcheck source=/dev/null
    source "$TESTBED_DIR/ports"
    local p=$TESTBED_DIR/pki
    wait_for 60 "kube-apiserver ready again" curl -fsS --cacert "$p/ca.crt" --cert "$p/admin.crt" \
      --key "$p/admin.key" "https://127.0.0.1:$API_PORT/readyz" || die "kube-apiserver did not come back"
  else
    log "started $name again"
  fi
}

stop_all() {
  [[ -f $TESTBED_DIR/pids ]] || return 0
  local pid name
  # Reverse order: the kubelet first (it stops its pods), etcd last.
  tac "$TESTBED_DIR/pids" | while read -r pid name; do
    stop_component "$pid" "$name"
  done
  rm -f "$TESTBED_DIR/pids"
}

pki() {
  local d=$TESTBED_DIR/pki
  mkdir -p "$d"
  # Every certificate is X.509 v3 with extensions: rustls rejects v1 certificates.
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$d/ca.key" -out "$d/ca.crt" -days 3650 \
    -subj "/CN=distcache-testbed-ca" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  sign() {
    local name=$1 subj=$2 ext=$3
    openssl req -newkey rsa:2048 -nodes -keyout "$d/$name.key" -out "$d/$name.csr" -subj "$subj" 2>/dev/null
    printf '%s\n' "$ext" >"$d/$name.ext"
    openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 3650 \
      -out "$d/$name.crt" -extfile "$d/$name.ext" 2>/dev/null
  }
  sign apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  sign admin "/O=system:masters/CN=testbed-admin" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

kubeconfig() {
  local server=$1 out=$2 d=$TESTBED_DIR/pki
  cat >"$out" <<KC
apiVersion: v1
kind: Config
clusters:
  - name: testbed
    cluster:
      server: $server
      certificate-authority-data: $(base64 -w0 <"$d/ca.crt")
users:
  - name: admin
    user:
      client-certificate-data: $(base64 -w0 <"$d/admin.crt")
      client-key-data: $(base64 -w0 <"$d/admin.key")
contexts:
  - name: testbed
    context: { cluster: testbed, user: admin }
current-context: testbed
KC
}

up() {
  if [[ -f $TESTBED_DIR/pids ]]; then
    log "a test bed seems to run already ($TESTBED_DIR/pids); stopping it first"
    stop_all
  fi
  bash "$HERE/build-kube.sh"
  bash "$HERE/build-apiextensions.sh"
  bash "$HERE/install-helm.sh"
  command -v etcd >/dev/null || die "etcd not found (apt-get install etcd-server; build-kube.sh does it as root)"
  rm -rf "$TESTBED_DIR"
  mkdir -p "$TESTBED_DIR"
  pki
  read -r ETCD_CLIENT ETCD_PEER API_PORT <<<"$(free_ports 3)"
  printf 'ETCD_CLIENT=%s\nAPI_PORT=%s\n' "$ETCD_CLIENT" "$API_PORT" >"$TESTBED_DIR/ports"
  local server=https://127.0.0.1:$API_PORT
  start etcd etcd --name testbed --data-dir "$TESTBED_DIR/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "testbed=http://127.0.0.1:$ETCD_PEER"
  wait_for 30 "etcd ready on 127.0.0.1:$ETCD_CLIENT" curl -fsS "http://127.0.0.1:$ETCD_CLIENT/health" ||
    { stop_all; die "etcd did not start; see $TESTBED_DIR/etcd.log"; }
  local p=$TESTBED_DIR/pki
  start kube-apiserver "$KUBE_BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_CLIENT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" --insecure-port 0 \
    --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" --client-ca-file "$p/ca.crt" \
    --authorization-mode Node,RBAC --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
    --api-audiences https://kubernetes.default.svc --service-cluster-ip-range 10.0.0.0/24 \
    --disable-admission-plugins ServiceAccount --allow-privileged=false
  kubeconfig "$server" "$TESTBED_DIR/kubeconfig"
  wait_for 60 "kube-apiserver ready on $server" curl -fsS --cacert "$p/ca.crt" --cert "$p/admin.crt" \
    --key "$p/admin.key" "$server/readyz" || { stop_all; die "kube-apiserver did not start; see $TESTBED_DIR/kube-apiserver.log"; }
  mkdir -p "$TESTBED_DIR/flex"
  start kube-controller-manager "$KUBE_BIN/kube-controller-manager" --kubeconfig "$TESTBED_DIR/kubeconfig" \
    --service-account-private-key-file "$p/sa.key" --root-ca-file "$p/ca.crt" \
    --use-service-account-credentials=true --controllers='*' --leader-elect=false --secure-port 0 --port 0 \
    --flex-volume-plugin-dir "$TESTBED_DIR/flex"
  # The controller-manager works once the service-account controller has made `default` in `default`.
  wait_for 60 "kube-controller-manager running (ServiceAccount default/default exists)" curl -fsS \
    --cacert "$p/ca.crt" --cert "$p/admin.crt" --key "$p/admin.key" \
    "$server/api/v1/namespaces/default/serviceaccounts/default" ||
    { stop_all; die "kube-controller-manager did not start; see $TESTBED_DIR/kube-controller-manager.log"; }
  if [[ -x $KUBELET_BIN ]]; then
    start test-kubelet "$KUBELET_BIN" --kubeconfig "$TESTBED_DIR/kubeconfig" --dir "$TESTBED_DIR/kubelet" \
      --binaries "$TARGET/debug" --pod-subnet "${TESTBED_POD_SUBNET:-127.0.0}"
    wait_for 30 "test kubelet registered its Node" curl -fsS --cacert "$p/ca.crt" --cert "$p/admin.crt" \
      --key "$p/admin.key" "$server/api/v1/nodes/testbed-node" ||
      { stop_all; die "the test kubelet did not register; see $TESTBED_DIR/test-kubelet.log"; }
  else
    log "no test kubelet at $KUBELET_BIN (build it: cargo build -p distcache-tests --bins); pods will not run"
  fi
  crd_up
  status
}

crd_up() {
  [[ -f $TESTBED_DIR/ports ]] || die "the test bed is not running: testbed.sh up first"
  # `up` starts it too: a second one would be an orphan nobody stops.
  local running
  running=$(awk '$2 == "apiextensions-apiserver" {print $1}' "$TESTBED_DIR/pids" 2>/dev/null)
  if [[ -n $running ]] && kill -0 "$running" 2>/dev/null && [[ -f $TESTBED_DIR/kubeconfig-crd ]]; then
    log "apiextensions-apiserver 1.36.4 already running (pid $running)"
    return 0
  fi
  [[ -x $APIEXT_BIN ]] || bash "$HERE/build-apiextensions.sh"
  # shellcheck source=/dev/null
  source "$TESTBED_DIR/ports"
  local port p=$TESTBED_DIR/pki
  port=$(free_ports 1)
  # The admission policies of a 1.36 server watch their objects on the core API, which 1.20 does not serve (they
  # would keep it un-ready); priority and fairness likewise. Both are off: this server only checks CRD schemas.
  start apiextensions-apiserver "$APIEXT_BIN" --etcd-servers "http://127.0.0.1:$ETCD_CLIENT" \
    --etcd-prefix /apiextensions-1.36 --bind-address 127.0.0.1 --secure-port "$port" \
    --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" --client-ca-file "$p/ca.crt" \
    --kubeconfig "$TESTBED_DIR/kubeconfig" --authentication-kubeconfig "$TESTBED_DIR/kubeconfig" \
    --authorization-kubeconfig "$TESTBED_DIR/kubeconfig" --enable-priority-and-fairness=false \
    --disable-admission-plugins MutatingAdmissionPolicy,ValidatingAdmissionPolicy
  kubeconfig "https://127.0.0.1:$port" "$TESTBED_DIR/kubeconfig-crd"
  wait_for 60 "apiextensions-apiserver 1.36.4 ready on https://127.0.0.1:$port" curl -fsS --cacert "$p/ca.crt" \
    --cert "$p/admin.crt" --key "$p/admin.key" "https://127.0.0.1:$port/readyz" ||
    die "apiextensions-apiserver did not start; see $TESTBED_DIR/apiextensions-apiserver.log"
}

crd_down() {
  [[ -f $TESTBED_DIR/pids ]] || return 0
  local pid
  while read -r pid; do
    stop_component "$pid" apiextensions-apiserver
  done < <(awk '$2 == "apiextensions-apiserver" {print $1}' "$TESTBED_DIR/pids")
  sed -i '/ apiextensions-apiserver$/d' "$TESTBED_DIR/pids"
  rm -f "$TESTBED_DIR/kubeconfig-crd"
}

status() {
  if [[ ! -f $TESTBED_DIR/pids ]]; then
    echo "the test bed is not running (tests/testbed/testbed.sh up)"
    return 1
  fi
  echo "test bed running: $(awk '{printf "%s(%s) ", $2, $1}' "$TESTBED_DIR/pids")"
  echo "use it:  export KUBECONFIG=$TESTBED_DIR/kubeconfig PATH=$KUBE_BIN:$HELM_BIN:\$PATH; kubectl get ns; helm list -A"
  echo "stop it: tests/testbed/testbed.sh down"
}

case ${1:-} in
  up) up ;;
  down)
    stop_all
    rm -rf "$TESTBED_DIR/etcd-data" "$TESTBED_DIR/kubelet"
    log "test bed down"
    ;;
  status) status ;;
  crd-up) crd_up ;;
  restart) restart "${2:?usage: $0 restart NAME}" ;;
  crd-down) crd_down ;;
  *) die "usage: $0 up|down|status|crd-up|crd-down|restart NAME" ;;
esac
