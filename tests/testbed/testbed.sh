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
# no cluster DNS, no container isolation (pods are processes on 127.0.0.x); KUBELET=real below has all of them.
# See tests/testbed/README.md.
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

# KUBELET=real: a real node instead of the test kubelet. The whole bed then runs in the network namespace
# $BED_NETNS (entered with nsenter --net, which keeps the mount namespace: `ip netns exec` would hide the cgroup
# mounts the kubelet and runc need), with a veth to the host, the pod bridge and no default route; containerd and
# the kubelet v1.20.2 run pods from images imported into containerd's k8s.io namespace. `down` removes what `up`
# added and restores the host settings the kubelet changes. With kube-scheduler, kube-proxy (iptables) and a cluster DNS for cluster.local.
REQUESTED_MODE=${KUBELET:-test}
KUBELET_MODE=$REQUESTED_MODE
BED_NETNS=distcache-bed
BED_HOST_IF=dcbed-host
BED_NODE_IF=dcbed-node
BED_HOST_ADDR=10.213.0.1
BED_NODE_ADDR=10.213.0.2
BED_POD_CIDR=10.213.128.0/24
BED_POD_GATEWAY=10.213.128.1
BED_SERVICE_CIDR=10.213.64.0/24
BED_NODE_NAME=distcache-bed-node
PAUSE_IMAGE=localhost/distcache-testbed/pause:3.2
# The host settings the kubelet changes (it sets them for its own OOM and panic policy).
KUBELET_SYSCTLS=(kernel.panic kernel.panic_on_oops vm.overcommit_memory)

log() { printf '==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

[[ $KUBELET_MODE == test || $KUBELET_MODE == real ]] || die "KUBELET must be test or real, got '$KUBELET_MODE'"
# A bed brought up with a real node is taken down as one, whatever KUBELET says then.
[[ -f $TESTBED_DIR/real-node ]] && KUBELET_MODE=real
real() { [[ $KUBELET_MODE == real ]]; }

# in_bed COMMAND...: runs COMMAND in the bed's network namespace (real node), else as it is.
in_bed() {
  if real; then
    nsenter --net="/run/netns/$BED_NETNS" "$@"
  else
    "$@"
  fi
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
  # nsenter and setsid exec what they run: $! is the component's own PID.
  if real; then
    nsenter --net="/run/netns/$BED_NETNS" setsid "$@" >>"$TESTBED_DIR/$name.log" 2>&1 </dev/null &
  else
    setsid "$@" >>"$TESTBED_DIR/$name.log" 2>&1 </dev/null &
  fi
  echo "$! $name" >>"$TESTBED_DIR/pids"
}

# stop_component PID NAME: SIGTERM, up to 10 s to exit, then SIGKILL; only while PID is still the process that was
# started as NAME (a recycled PID runs something else, which is left alone).
stop_component() {
  local pid=$1 name=$2 binary=$2
  [[ $name == test-kubelet ]] && binary=distcache-test-kubelet
  [[ $name == cluster-dns ]] && binary=distcache-testbed-dns
  kill -0 "$pid" 2>/dev/null || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$binary" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    # Exited, not yet reaped: its parent is PID 1 (the shell that started it is gone), which may reap only every
    # few seconds; a zombie holds no port, file or mount.
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && break
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
subjectAltName=IP:127.0.0.1,IP:$BED_NODE_ADDR,IP:${BED_SERVICE_CIDR%.0/24}.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  # The real node's kubelet: a client of the API (the Node authorizer's system:node:<name>) and the server of its
  # own port 10250.
  sign node "/O=system:nodes/CN=system:node:$BED_NODE_NAME" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth,serverAuth
subjectAltName=IP:$BED_NODE_ADDR,DNS:$BED_NODE_NAME"
  # The API server's client certificate towards the kubelet (logs, exec), as kubeadm's apiserver-kubelet-client.
  sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  sign admin "/O=system:masters/CN=testbed-admin" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

kubeconfig() {
  local server=$1 out=$2 user=${3:-admin} d=$TESTBED_DIR/pki
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
      client-certificate-data: $(base64 -w0 <"$d/$user.crt")
      client-key-data: $(base64 -w0 <"$d/$user.key")
contexts:
  - name: testbed
    context: { cluster: testbed, user: admin }
current-context: testbed
KC
}

up() {
  if [[ -f $TESTBED_DIR/real-node ]]; then
    log "a real-node test bed seems to run already; taking it down first"
    KUBELET_MODE=real
    real_down
  elif [[ -f $TESTBED_DIR/pids ]]; then
    log "a test bed seems to run already ($TESTBED_DIR/pids); stopping it first"
    stop_all
  fi
  KUBELET_MODE=$REQUESTED_MODE
  if real; then
    bash "$HERE/build-kube.sh" --node
  else
    bash "$HERE/build-kube.sh"
  fi
  bash "$HERE/build-apiextensions.sh"
  bash "$HERE/install-helm.sh"
  command -v etcd >/dev/null || die "etcd not found (apt-get install etcd-server; build-kube.sh does it as root)"
  rm -rf "$TESTBED_DIR"
  mkdir -p "$TESTBED_DIR"
  pki
  read -r ETCD_CLIENT ETCD_PEER API_PORT <<<"$(free_ports 3)"
  printf 'ETCD_CLIENT=%s\nAPI_PORT=%s\n' "$ETCD_CLIENT" "$API_PORT" >"$TESTBED_DIR/ports"
  local api_addr=127.0.0.1 api_bind=127.0.0.1 service_cidr=10.0.0.0/24
  local admission=(--disable-admission-plugins ServiceAccount)
  if real; then
    real_network_up
    api_addr=$BED_NODE_ADDR api_bind=0.0.0.0 service_cidr=$BED_SERVICE_CIDR
    # Where a client on the host reaches the API server (tests/src/testbed.rs checks it answers).
    printf 'API_ADDR=%s\n' "$api_addr" >>"$TESTBED_DIR/ports"
    # Pods get their service account token: the operator reaches the API through the `kubernetes` Service.
    # `kubectl logs` goes through the kubelet, which accepts client certificates of the bed's CA.
    admission=(--kubelet-client-certificate "$TESTBED_DIR/pki/apiserver-kubelet-client.crt"
      --kubelet-client-key "$TESTBED_DIR/pki/apiserver-kubelet-client.key" --kubelet-preferred-address-types InternalIP)
  fi
  local server=https://$api_addr:$API_PORT
  start etcd etcd --name testbed --data-dir "$TESTBED_DIR/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "testbed=http://127.0.0.1:$ETCD_PEER"
  wait_for 30 "etcd ready on 127.0.0.1:$ETCD_CLIENT" in_bed curl -fsS "http://127.0.0.1:$ETCD_CLIENT/health" ||
    { stop_all; die "etcd did not start; see $TESTBED_DIR/etcd.log"; }
  local p=$TESTBED_DIR/pki
  start kube-apiserver "$KUBE_BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_CLIENT" \
    --bind-address "$api_bind" --advertise-address "$api_addr" --secure-port "$API_PORT" --insecure-port 0 \
    --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" --client-ca-file "$p/ca.crt" \
    --authorization-mode Node,RBAC --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
    --api-audiences https://kubernetes.default.svc --service-cluster-ip-range "$service_cidr" \
    "${admission[@]}" --allow-privileged=false
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
  if real; then
    real_node_up "$server"
    status
    return
  elif [[ -x $KUBELET_BIN ]]; then
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

# --- the real node (KUBELET=real) ------------------------------------------------------------------------------

# real_network_up: the namespace, a veth pair (host $BED_HOST_ADDR, node $BED_NODE_ADDR), the pod bridge with the
# Service range routed on it, and host routes to the pods and Services. No default route in the namespace.
real_network_up() {
  local missing=() pkg
  for pkg in containerd runc containernetworking-plugins util-linux iproute2; do
    [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) == "install ok installed" ]] || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "missing packages (${missing[*]}) and not root"
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
  fi
  ! ip netns list | grep -qw "$BED_NETNS" || die "network namespace $BED_NETNS exists: another real-node bed? (testbed.sh down)"
  touch "$TESTBED_DIR/real-node"
  ip netns list | awk '{print $1}' >"$TESTBED_DIR/netns.before"
  local n=/run/netns/$BED_NETNS
  ip netns add "$BED_NETNS"
  ip link add "$BED_HOST_IF" type veth peer name "$BED_NODE_IF"
  ip link set "$BED_NODE_IF" netns "$BED_NETNS"
  ip addr add "$BED_HOST_ADDR/30" dev "$BED_HOST_IF"
  ip link set "$BED_HOST_IF" up
  nsenter --net="$n" ip link set lo up
  nsenter --net="$n" ip addr add "$BED_NODE_ADDR/30" dev "$BED_NODE_IF"
  nsenter --net="$n" ip link set "$BED_NODE_IF" up
  nsenter --net="$n" ip link add dcbr0 type bridge
  nsenter --net="$n" ip addr add "$BED_POD_GATEWAY/${BED_POD_CIDR#*/}" dev dcbr0
  nsenter --net="$n" ip link set dcbr0 up
  nsenter --net="$n" ip route add "$BED_SERVICE_CIDR" dev dcbr0
  nsenter --net="$n" sysctl -qw net.ipv4.ip_forward=1
  ip route add "$BED_POD_CIDR" via "$BED_NODE_ADDR"
  ip route add "$BED_SERVICE_CIDR" via "$BED_NODE_ADDR"
  log "network namespace $BED_NETNS: node $BED_NODE_ADDR, pods $BED_POD_CIDR, Services $BED_SERVICE_CIDR"
}

# real_node_up SERVER: containerd (its own root, state and socket under $TESTBED_DIR), the pause image, the CNI
# bridge, and the kubelet; waits for the Node to be Ready.
real_node_up() {
  local server=$1 d=$TESTBED_DIR/containerd k=$TESTBED_DIR/kubelet
  mkdir -p "$d" "$TESTBED_DIR/cni" "$k"
  cat >"$d/config.toml" <<TOML
version = 2
root = "$d/root"
state = "$d/state"
[grpc]
  address = "$d/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  # Without CAP_SYS_RESOURCE runc cannot lower oom_score_adj: "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  sandbox_image = "$PAUSE_IMAGE"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$d/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$TESTBED_DIR/cni"
TOML
  cat >"$TESTBED_DIR/cni/10-distcache-bed.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "distcache-bed",
  "plugins": [
    { "type": "bridge", "bridge": "dcbr0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "$BED_POD_CIDR", "gateway": "$BED_POD_GATEWAY" }]],
                "routes": [{ "dst": "0.0.0.0/0" }], "dataDir": "$TESTBED_DIR/cni-ipam" } },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
CNI
  # Fixed paths, whatever the flags say: the shims' sockets under /run/containerd, container logs under
  # /var/log/pods (links in /var/log/containers), the device-plugin socket directory under /var/lib/kubelet, the
  # CNI library's result cache under /var/lib/cni and its lock under /etc/cni. `down` removes those `up` made, and
  # from a result cache that was there before only this bed's entries.
  local fixed
  for fixed in /run/containerd /var/log/pods /var/log/containers /var/lib/kubelet /var/lib/cni /etc/cni; do
    [[ -e $fixed ]] || echo "$fixed" >>"$TESTBED_DIR/made-dirs"
  done
  start containerd containerd --config "$d/config.toml"
  wait_for 30 "containerd ready" in_bed ctr --address "$d/containerd.sock" version ||
    die "containerd did not start; see $TESTBED_DIR/containerd.log"
  python3 "$HERE/oci-image.py" "$TESTBED_DIR/pause.tar" "$PAUSE_IMAGE" "$KUBE_BIN/pause:/pause" \
    --entrypoint /pause --user 65535:65535
  in_bed ctr --address "$d/containerd.sock" -n k8s.io images import "$TESTBED_DIR/pause.tar" >/dev/null
  kubeconfig "$server" "$TESTBED_DIR/kubeconfig-node" node
  printf 'nameserver %s\n' "${BED_SERVICE_CIDR%.0/24}.10" >"$TESTBED_DIR/resolv.conf"
  cat >"$TESTBED_DIR/kubelet.yaml" <<KUBELET
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $BED_NODE_ADDR
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: false }
  x509: { clientCAFile: $TESTBED_DIR/pki/ca.crt }
authorization: { mode: AlwaysAllow }
tlsCertFile: $TESTBED_DIR/pki/node.crt
tlsPrivateKeyFile: $TESTBED_DIR/pki/node.key
cgroupDriver: cgroupfs
clusterDomain: cluster.local
clusterDNS: [${BED_SERVICE_CIDR%.0/24}.10]
resolvConf: $TESTBED_DIR/resolv.conf
failSwapOn: false
podCIDR: $BED_POD_CIDR
serializeImagePulls: false
evictionHard: { memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%" }
KUBELET
  local name
  for name in "${KUBELET_SYSCTLS[@]}"; do
    printf '%s=%s\n' "$name" "$(sysctl -n "$name")"
  done >"$TESTBED_DIR/sysctls.before"
  start kubelet "$KUBE_BIN/kubelet" --config "$TESTBED_DIR/kubelet.yaml" --kubeconfig "$TESTBED_DIR/kubeconfig-node" \
    --container-runtime=remote --container-runtime-endpoint="unix://$d/containerd.sock" \
    --node-ip="$BED_NODE_ADDR" --hostname-override="$BED_NODE_NAME" --root-dir="$k" --cert-dir="$k/pki" --v=1
  wait_for 60 "kubelet: Node $BED_NODE_NAME Ready" node_ready "$server" ||
    die "the kubelet's Node did not become Ready; see $TESTBED_DIR/kubelet.log"
  start kube-scheduler "$KUBE_BIN/kube-scheduler" --kubeconfig "$TESTBED_DIR/kubeconfig" --leader-elect=false \
    --port=0 --secure-port=0
  # iptables mode inside the namespace; every conntrack setting 0, so that it changes nothing host-wide (the
  # conntrack table size is global); --masquerade-all so that a pod reaching a Service backed by a pod on the same
  # bridge gets its reply through the gateway (no br_netfilter here).
  start kube-proxy "$KUBE_BIN/kube-proxy" --kubeconfig "$TESTBED_DIR/kubeconfig" --proxy-mode=iptables \
    --hostname-override="$BED_NODE_NAME" --cluster-cidr="$BED_POD_CIDR" --masquerade-all \
    --conntrack-max-per-core=0 --conntrack-min=0 --conntrack-tcp-timeout-established=0 \
    --conntrack-tcp-timeout-close-wait=0 --healthz-bind-address=127.0.0.1:10256 --metrics-bind-address=127.0.0.1:10249
  local kubernetes_ip=${BED_SERVICE_CIDR%.0/24}.1
  wait_for 60 "kube-proxy: Service kubernetes ($kubernetes_ip:443) in iptables" service_rule "$kubernetes_ip" ||
    die "kube-proxy did not program the kubernetes Service; see $TESTBED_DIR/kube-proxy.log"
  cluster_dns_up
}

# cluster_dns_up: the cluster DNS (distcache-testbed-dns: hickory-server answering cluster.local from the API's
# Services and Endpoints) on the pod gateway, behind the Service kube-system/kube-dns at the kubelet's clusterDNS
# address, as CoreDNS sits behind it in a cluster. Its Endpoints are written here (the server is not a pod).
cluster_dns_up() {
  local dns_ip=${BED_SERVICE_CIDR%.0/24}.10 bin=$TARGET/debug/distcache-testbed-dns
  [[ -x $bin ]] || die "no $bin (cargo build -p distcache-tests --bins; make testbed-up does it)"
  start cluster-dns "$bin" --kubeconfig "$TESTBED_DIR/kubeconfig" --listen "$BED_POD_GATEWAY:53" \
    --domain cluster.local
  "$KUBE_BIN/kubectl" --kubeconfig "$TESTBED_DIR/kubeconfig" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Service
metadata: { name: kube-dns, namespace: kube-system, labels: { k8s-app: kube-dns } }
spec:
  clusterIP: $dns_ip
  ports: [{ name: dns, port: 53, protocol: UDP }, { name: dns-tcp, port: 53, protocol: TCP }]
---
apiVersion: v1
kind: Endpoints
metadata: { name: kube-dns, namespace: kube-system, labels: { k8s-app: kube-dns } }
subsets:
  - addresses: [{ ip: $BED_POD_GATEWAY }]
    ports: [{ name: dns, port: 53, protocol: UDP }, { name: dns-tcp, port: 53, protocol: TCP }]
YAML
  # From the host, through kube-proxy's rules for the kube-dns Service, as a pod asks.
  wait_for 30 "cluster DNS: kubernetes.default.svc.cluster.local at $dns_ip" \
    python3 "$HERE/dns-query.py" "$dns_ip" kubernetes.default.svc.cluster.local A ||
    die "the cluster DNS does not answer; see $TESTBED_DIR/cluster-dns.log"
}

service_rule() {
  in_bed iptables -t nat -S KUBE-SERVICES | grep -q -- "-d $1/32"
}

node_ready() {
  local p=$TESTBED_DIR/pki
  curl -fsS --cacert "$p/ca.crt" --cert "$p/admin.crt" --key "$p/admin.key" "$1/api/v1/nodes/$BED_NODE_NAME" |
    python3 -c 'import json,sys; n=json.load(sys.stdin); sys.exit(0 if any(c["type"]=="Ready" and c["status"]=="True" for c in n["status"].get("conditions",[])) else 1)'
}

# real_down: the pods' containers (before containerd stops), every process, mounts under $TESTBED_DIR, the pod
# network namespaces containerd made, the kubelet's cgroups, the namespace and its links, the host routes, and the
# host settings the kubelet changed.
real_down() {
  local d=$TESTBED_DIR/containerd id pid
  # The kubelet first: alive, it would start the containers killed below again.
  pid=$(awk '$2 == "kubelet" {print $1}' "$TESTBED_DIR/pids" 2>/dev/null)
  [[ -z $pid ]] || stop_component "$pid" kubelet
  if [[ -S $d/containerd.sock ]] && ip netns list | grep -qw "$BED_NETNS"; then
    # --force: containerd kills the task with SIGKILL and waits for it to exit before deleting it.
    for id in $(in_bed ctr --address "$d/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null); do
      in_bed ctr --address "$d/containerd.sock" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1 || true
    done
  fi
  stop_all
  local m
  # Deepest first: overlay snapshots and the kubelet's bind mounts.
  while read -r m; do umount -l "$m" 2>/dev/null || true; done < <(awk -v t="$TESTBED_DIR" 'index($2, t) == 1 {print $2}' /proc/self/mounts | sort -r)
  # Pod network namespaces made by containerd's CNI while this bed ran.
  if [[ -f $TESTBED_DIR/netns.before ]]; then
    for m in $(ip netns list | awk '$1 ~ /^cni-/ {print $1}'); do
      grep -qx "$m" "$TESTBED_DIR/netns.before" || ip netns delete "$m" 2>/dev/null || true
    done
  fi
  local h
  for h in /sys/fs/cgroup/*/kubepods; do
    [[ -d $h ]] && find "$h" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  ip route del "$BED_POD_CIDR" via "$BED_NODE_ADDR" 2>/dev/null || true
  ip route del "$BED_SERVICE_CIDR" via "$BED_NODE_ADDR" 2>/dev/null || true
  ip link del "$BED_HOST_IF" 2>/dev/null || true
  ip netns delete "$BED_NETNS" 2>/dev/null || true
  if [[ -f $TESTBED_DIR/sysctls.before ]]; then
    sysctl -q -p "$TESTBED_DIR/sysctls.before" >/dev/null
  fi
  if [[ -f $TESTBED_DIR/made-dirs ]]; then
    while read -r m; do rm -rf "$m"; done <"$TESTBED_DIR/made-dirs"
  fi
  # The sandboxes killed above had no CNI DEL: their results stay cached, as <network>-<sandbox id>-<interface>.
  local result sandbox
  for result in /var/lib/cni/results/distcache-bed-*-eth0; do
    [[ -f $result ]] || continue
    sandbox=${result#/var/lib/cni/results/distcache-bed-}
    sandbox=${sandbox%-eth0}
    rm -f "$result" "/var/lib/cni/results/cni-loopback-$sandbox-lo"
  done
  log "real node removed: namespace $BED_NETNS, links, routes, mounts, cgroups; host settings restored"
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
    if real; then real_down; else stop_all; fi
    rm -rf "$TESTBED_DIR/etcd-data" "$TESTBED_DIR/kubelet" "$TESTBED_DIR/containerd" "$TESTBED_DIR/real-node"
    log "test bed down"
    ;;
  status) status ;;
  crd-up) crd_up ;;
  restart) restart "${2:?usage: $0 restart NAME}" ;;
  crd-down) crd_down ;;
  *) die "usage: $0 up|down|status|crd-up|crd-down|restart NAME" ;;
esac
