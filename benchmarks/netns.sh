#!/usr/bin/env bash
# Two "nodes" on one Linux machine: network namespaces joined by a bridge, each with its own address.
#
#   sudo benchmarks/netns.sh up      # create (idempotent: re-running fixes what is missing)
#   sudo benchmarks/netns.sh down    # remove everything it made (idempotent)
#   sudo benchmarks/netns.sh status  # what exists now
#
# Root is required (ip netns / ip link). Layout (override with the variables below):
#
#   host:  bridge $RYZ_BRIDGE 10.77.0.254/24
#   node a: namespace ryz-a, interface $RYZ_IFNAME 10.77.0.1/24 (+ lo)
#   node b: namespace ryz-b, interface $RYZ_IFNAME 10.77.0.2/24 (+ lo)
#
# Both namespaces name their interface the same ($RYZ_IFNAME, default "ryz0") so one
# GLOO_SOCKET_IFNAME=ryz0 makes gloo bind to the node's own address on every node (without it
# gloo resolves the hostname, which is the same on both "nodes" and maps to loopback).
# Traffic between the nodes crosses two veth pairs and the bridge: real TCP between distinct
# addresses, real connection resets when one side dies; the bandwidth is memory bandwidth.
set -euo pipefail

PREFIX=${RYZ_NETNS_PREFIX:-ryz}
BRIDGE=${RYZ_BRIDGE:-ryzbr0}
IFNAME=${RYZ_IFNAME:-ryz0}
SUBNET=${RYZ_SUBNET:-10.77.0}
NODES=(a b)

need_root() {
    if [ "$(id -u)" != 0 ]; then echo "netns.sh: root is required (ip netns, ip link)" >&2; exit 2; fi
    command -v ip >/dev/null || { echo "netns.sh: the 'ip' command (iproute2) is required" >&2; exit 2; }
}

# (no `cmd | grep -q`: under pipefail grep's early exit fails the pipeline with SIGPIPE)
has_ns() { [[ " $(ip netns list | awk '{print $1}' | tr '\n' ' ') " == *" $1 "* ]]; }

up() {
    need_root
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    [[ "$(ip addr show dev "$BRIDGE")" == *"$SUBNET.254/"* ]] || ip addr add "$SUBNET.254/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local i=0
    for n in "${NODES[@]}"; do
        i=$((i + 1))
        local ns="$PREFIX-$n" host_end="${PREFIX}h$n"
        has_ns "$ns" || ip netns add "$ns"
        if ! ip netns exec "$ns" ip link show "$IFNAME" >/dev/null 2>&1; then
            ip link del "$host_end" >/dev/null 2>&1 || true  # a half-made pair from an interrupted run
            ip link add "$host_end" type veth peer name "${PREFIX}n$n"
            ip link set "${PREFIX}n$n" netns "$ns"
            ip netns exec "$ns" ip link set "${PREFIX}n$n" name "$IFNAME"
        fi
        ip link set "$host_end" master "$BRIDGE"
        ip link set "$host_end" up
        [[ "$(ip netns exec "$ns" ip addr show dev "$IFNAME")" == *"$SUBNET.$i/"* ]] \
            || ip netns exec "$ns" ip addr add "$SUBNET.$i/24" dev "$IFNAME"
        ip netns exec "$ns" ip link set "$IFNAME" up
        ip netns exec "$ns" ip link set lo up
    done
    # the bridge forwards between the nodes even where the host filters bridged traffic
    if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
        echo 0 > /proc/sys/net/bridge/bridge-nf-call-iptables || true
    fi
    status
}

down() {
    need_root
    for n in "${NODES[@]}"; do
        local ns="$PREFIX-$n"
        # a namespace's processes keep it alive only as long as they run; kill what we left there
        if has_ns "$ns"; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$ns"
        fi
        ip link del "${PREFIX}h$n" >/dev/null 2>&1 || true
    done
    ip link del "$BRIDGE" >/dev/null 2>&1 || true
}

status() {
    local i=0
    for n in "${NODES[@]}"; do
        i=$((i + 1))
        local ns="$PREFIX-$n"
        if has_ns "$ns"; then
            echo "node $n: namespace $ns, $IFNAME $(ip netns exec "$ns" ip -4 -o addr show dev "$IFNAME" 2>/dev/null | awk '{print $4}')"
        else
            echo "node $n: absent"
        fi
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
