#!/usr/bin/env bash
# The real-node mode of the bed, end to end on this machine (root): `KUBELET=real testbed.sh up` in a throw-away
# TESTBED_DIR; a pod placed by kube-scheduler and run by containerd as user 65532 on a read-only root file system
# with its service account token; the API server reached from the host through the `kubernetes` Service's
# ClusterIP (kube-proxy's rules); then `down`. Fails unless all of that held and `down` left the host as it found
# it (network namespaces, links, routes, mounts, cgroups, the sysctls the kubelet changes, conntrack size, the host's
# iptables rules, processes).
#
#   make testbed-real-check
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KUBECTL=${TESTBED_CACHE:-/var/cache/distcache/testbed}/kubernetes-v1.20.2/bin/kubectl
DIR=$(mktemp -d "${TMPDIR:-/tmp}/distcache-real-bed.XXXXXX")
export TESTBED_DIR=$DIR KUBELET=real

log() { printf '==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() {
  printf 'real-node check FAILED: %s\n' "$*" >&2
  exit 1
}

# What the real node may change on the host, and must give back.
host_state() {
  sysctl kernel.panic kernel.panic_on_oops vm.overcommit_memory
  sysctl net.netfilter.nf_conntrack_max 2>/dev/null || true
  iptables -S 2>/dev/null | sed 's/^/iptables /'
  iptables -t nat -S 2>/dev/null | sed 's/^/iptables-nat /'
  ip netns list | awk '{print "netns " $1}'
  ip -o link show | awk -F': ' '{print "link " $2}' | sed 's/@.*//'
  ip route show | sed 's/^/route /'
  awk -v d="$DIR" 'index($2, d) == 1 || $2 ~ /^\/run\/netns\// {print "mount " $2}' /proc/self/mounts
  find /sys/fs/cgroup -maxdepth 2 -name kubepods | sed 's/^/cgroup /'
  # Fixed paths the kubelet, containerd and CNI write to whatever their flags say (pod logs in v1.20), and the usual
  # places of their state, which the bed moves under its own directory.
  local path
  for path in /run/containerd /var/log/pods /var/log/containers /var/lib/kubelet /var/lib/dockershim \
    /var/lib/containerd /var/lib/cni /etc/cni/net.d /etc/kubernetes /run/flannel; do
    [[ -e $path ]] && echo "path $path $(find "$path" 2>/dev/null | wc -l)"
  done
  local name
  # (comm is cut at 15 characters: distcache-testbed-dns is distcache-testb; a zombie waiting for PID 1 to reap it
  # has exited, so it does not count)
  local running
  running=$(ps -e -o stat=,comm= | awk '$1 !~ /^Z/ {print $2}')
  for name in kubelet containerd containerd-shim pause distcache-testb; do
    grep -qx "$name" <<<"$running" && echo "process $name"
  done
  true
}

before=$(host_state)
brought_up=false
cleanup() {
  local rc=$?
  if $brought_up; then bash "$HERE/testbed.sh" down >/dev/null 2>&1 || true; fi
  rm -rf "$DIR"
  exit "$rc"
}
trap cleanup EXIT

started=$SECONDS
brought_up=true
bash "$HERE/testbed.sh" up
log "bed with a real node up in $((SECONDS - started)) s"
kubectl() { "$KUBECTL" --kubeconfig "$DIR/kubeconfig" "$@"; }

kubectl apply -f - <<'POD'
apiVersion: v1
kind: Pod
metadata: { name: sandbox-check, namespace: default }
spec:
  securityContext: { runAsUser: 65532, runAsGroup: 65532, runAsNonRoot: true }
  containers:
    - name: pause
      image: localhost/distcache-testbed/pause:3.2
      imagePullPolicy: Never
      securityContext: { readOnlyRootFilesystem: true, allowPrivilegeEscalation: false }
POD
deadline=$((SECONDS + 60))
until [[ $(kubectl get pod sandbox-check -o jsonpath='{.status.phase}') == Running ]]; do
  ((SECONDS < deadline)) || fail "the pod is not Running after 60 s: $(kubectl describe pod sandbox-check | tail -5)"
  sleep 0.5
done
ip=$(kubectl get pod sandbox-check -o jsonpath='{.status.podIP}')
[[ $ip == 10.213.128.* ]] || fail "pod IP $ip is not on the pod bridge (10.213.128.0/24)"
token=$(kubectl get pod sandbox-check -o jsonpath='{.spec.volumes[0].secret.secretName}')
[[ $token == default-token-* ]] || fail "no service account token mounted (volume secret: '$token')"
# The container's process: the pod's own pause runs as 65532 with a read-only root; the sandbox's runs as 65535.
pid=$(pgrep -x -u 65532 pause | head -n1)
[[ -n $pid ]] || fail "no pause process of uid 65532 (the pod's container)"
awk '$5 == "/" {print $6}' "/proc/$pid/mountinfo" | grep -q '^ro' || fail "the container's root file system is not read-only"
node=$(kubectl get pod sandbox-check -o jsonpath='{.spec.nodeName}')
[[ $node == distcache-bed-node ]] || fail "the pod was not scheduled onto the node (nodeName '$node')"
log "pod scheduled and ran: IP $ip, uid 65532, read-only root, token $token"
p=$DIR/pki
ready=$(curl -fsS -m 5 --cacert "$p/ca.crt" --cert "$p/admin.crt" --key "$p/admin.key" https://10.213.64.1/readyz) ||
  fail "the API server does not answer through the kubernetes Service (10.213.64.1:443) from the host"
[[ $ready == ok ]] || fail "readyz through the kubernetes Service said '$ready'"
log "the kubernetes Service's ClusterIP reaches the API server from the host"

bash "$HERE/testbed.sh" down
brought_up=false
after=$(host_state)
if [[ $before != "$after" ]]; then
  diff <(printf '%s\n' "$before") <(printf '%s\n' "$after") >&2 || true
  fail "down left the host changed (diff above: < before up, > after down)"
fi
log "real-node check passed: down restored the host"
