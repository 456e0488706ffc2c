# Guest role "rng": a vhost-user-rng device (examples/virtio_rng.py) as the guest's hardware
# RNG (sourced by /init; busybox sh). Kernel command line:
#   tvh.bytes=N   how many bytes to read from /dev/hwrng (default 4096)
# Checks (markers): rng-device (virtio_rng is the current hw_random source), rng-read (N
# bytes arrived, not all the same byte: md5 printed for the host to compare runs).
bytes=${TVH_bytes:-4096}
cur=/sys/class/misc/hw_random/rng_current
n=0
while ! grep -q virtio "$cur" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
if grep -q virtio "$cur" 2>/dev/null; then
    tvh_ok "rng-device current=$(cat $cur | tr ' ' _)"
else
    tvh_fail "rng-device current=$(cat $cur 2>/dev/null | tr ' ' _) available=$(tr ' ' _ \
        </sys/class/misc/hw_random/rng_available 2>/dev/null)"
    return 1
fi
if ! dd if=/dev/hwrng of=/tmp/r bs=$bytes count=1 iflag=fullblock 2>/tmp/err; then
    tvh_fail "rng-read $(tr '\n' ' ' </tmp/err)"
    return 1
fi
got=$(wc -c </tmp/r)
distinct=$(od -An -v -tx1 /tmp/r | tr -s ' ' '\n' | grep . | sort -u | wc -l)
if [ "$got" = "$bytes" ] && [ "$distinct" -gt 200 ]; then
    tvh_ok "rng-read bytes=$got distinct=$distinct md5=$(md5sum </tmp/r | cut -d' ' -f1)"
else
    tvh_fail "rng-read bytes=$got distinct=$distinct (want $bytes, most of the 256 values)"
    return 1
fi
