# Guest role "blk-dd": the guest's view of a vhost-user-blk disk's speed, for
# bench/bench_peers.py (sourced by /init; busybox sh). O_DIRECT dd, so the guest's page
# cache is out of the way; the disk must hold tvh.off + tvh.mib MiB. Kernel command line:
#   tvh.dev=vda     the disk
#   tvh.off=BYTES   where the region starts (a multiple of 1 MiB; default 0)
#   tvh.mib=N       MiB written then read with 1 MiB requests (default 64)
#   tvh.n4k=N       4 KiB reads at queue depth 1 (default 2000)
# Markers: blk-dd-write MiBps=, blk-dd-read MiBps=, blk-dd-read4k iops= (the clock is
# /proc/uptime: 10 ms steps, so keep each phase above a second or so).
M=1048576
dev=/dev/${TVH_dev:-vda}
off=${TVH_off:-0} mib=${TVH_mib:-64} n4k=${TVH_n4k:-2000}
rc=0

cs() { awk '{ printf "%d", $1 * 100 }' /proc/uptime; }
per_s() { awk -v n="$1" -v c="$2" 'BEGIN { if (c < 1) c = 1; printf "%.1f", n * 100 / c }'; }
oneline() { tr '\n' ' ' <"$1"; }

n=0
while [ ! -b "$dev" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
if [ ! -b "$dev" ]; then
    tvh_fail "blk-dd no $dev"
    return 1
fi

t0=$(cs)
if dd if=/dev/zero of=$dev bs=$M seek=$((off / M)) count=$mib oflag=direct 2>/tmp/err; then
    t1=$(cs); tvh_ok "blk-dd-write mib=$mib MiBps=$(per_s $mib $((t1 - t0)))"
else
    tvh_fail "blk-dd-write $(oneline /tmp/err)"; rc=1
fi
t0=$(cs)
if dd if=$dev of=/dev/null bs=$M skip=$((off / M)) count=$mib iflag=direct 2>/tmp/err; then
    t1=$(cs); tvh_ok "blk-dd-read mib=$mib MiBps=$(per_s $mib $((t1 - t0)))"
else
    tvh_fail "blk-dd-read $(oneline /tmp/err)"; rc=1
fi
t0=$(cs)
if dd if=$dev of=/dev/null bs=4096 skip=$((off / 4096)) count=$n4k iflag=direct 2>/tmp/err; then
    t1=$(cs); tvh_ok "blk-dd-read4k n=$n4k iops=$(per_s $n4k $((t1 - t0)))"
else
    tvh_fail "blk-dd-read4k $(oneline /tmp/err)"; rc=1
fi
return $rc
