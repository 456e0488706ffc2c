# Guest role "net": static IP on eth0, ping a peer through the vhost-user-net backend
# (sourced by /init; busybox sh). Kernel command line knobs:
#   tvh.ip=10.77.0.1/24     address of eth0
#   tvh.peer=10.77.0.2      address to ping
#   tvh.count=5             echo requests that must all be answered
#   tvh.wait=60             seconds to wait for the first answer (the peer may boot later)
#   tvh.quiet=2             after our own pings, stay up until the peer's echo requests
#                           (at least tvh.count) stopped arriving for this many seconds,
#                           so both guests can finish without a host-side rendezvous
# Checks (markers): net-link, net-first-reply, net-ping, net-peer-pinged-us.
ip=${TVH_ip:-10.77.0.1/24}
peer=${TVH_peer:-10.77.0.2}
count=${TVH_count:-5}
wait_s=${TVH_wait:-60}
quiet=${TVH_quiet:-2}
rc=0

secs() { cut -d. -f1 /proc/uptime; }
in_echos() {  # Icmp InEchos: echo requests this guest received
    awk '$1 == "Icmp:" { if (!c) { for (i = 2; i <= NF; i++) if ($i == "InEchos") c = i }
                          else { print $c; exit } }' /proc/net/snmp
}
stats() {
    s=/sys/class/net/eth0/statistics
    echo "rx_packets=$(cat $s/rx_packets) tx_packets=$(cat $s/tx_packets)" \
         "rx_dropped=$(cat $s/rx_dropped) tx_dropped=$(cat $s/tx_dropped)"
}

n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
if [ ! -e /sys/class/net/eth0 ]; then
    tvh_fail "net-link no eth0 (have: $(ls /sys/class/net | tr '\n' ' '))"
    return 1
fi
ip link set lo up
ip link set eth0 up
ip addr add "$ip" dev eth0
n=0
while [ "$(cat /sys/class/net/eth0/operstate)" != up ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
tvh_info "net-dev mac=$(cat /sys/class/net/eth0/address) features=$(cat /sys/class/net/eth0/device/features 2>/dev/null)"
if [ "$(cat /sys/class/net/eth0/operstate)" = up ]; then
    tvh_ok "net-link ip=$ip"
else
    tvh_fail "net-link operstate=$(cat /sys/class/net/eth0/operstate)"; return 1
fi

# The peer may still be booting: one probe per second until it answers.
t_end=$(( $(secs) + wait_s ))
answered=0
while [ "$(secs)" -lt $t_end ]; do
    if ping -c 1 -W 1 "$peer" >/dev/null 2>&1; then answered=1; break; fi
done
if [ $answered = 0 ]; then
    tvh_fail "net-first-reply no answer from $peer within ${wait_s}s $(stats)"; return 1
fi
tvh_ok "net-first-reply peer=$peer uptime=$(tvh_uptime)"

out=$(ping -c "$count" -i 0.2 -W 2 "$peer" 2>&1)
summary=$(echo "$out" | grep 'packets transmitted')
sent=$(echo "$summary" | awk '{ print $1 }')
recv=$(echo "$summary" | awk '{ print $4 }')
rtt=$(echo "$out" | awk -F' = ' '/round-trip/ { print $2 }' | tr -d ' ')
if [ "$sent" = "$count" ] && [ "$recv" = "$count" ]; then
    tvh_ok "net-ping sent=$sent received=$recv rtt_min_avg_max=$rtt"
else
    tvh_fail "net-ping sent=${sent:-?} received=${recv:-?} want=$count: $(echo "$out" | tail -2 | tr '\n' ' ')"
    rc=1
fi

# Stay up while the peer is still pinging us.
last=$(in_echos) idle=0
t_end=$(( $(secs) + wait_s ))
while [ "$(secs)" -lt $t_end ]; do
    sleep 0.5
    now=$(in_echos)
    if [ "$now" != "$last" ]; then last=$now idle=0; else idle=$((idle + 1)); fi
    [ "$now" -ge "$count" ] && [ $idle -ge $((quiet * 2)) ] && break
done
if [ "$last" -ge "$count" ]; then tvh_ok "net-peer-pinged-us echo_requests=$last"
else tvh_fail "net-peer-pinged-us echo_requests=$last want>=$count"; rc=1; fi
tvh_info "net-stats $(stats)"
return $rc
