# Guest role "blk": exercises a vhost-user-blk disk (sourced by /init; busybox sh).
# All offsets/lengths are bytes and multiples of 64 KiB. Kernel command line knobs:
#   tvh.dev=vda             the disk
#   tvh.size=N              expected capacity in bytes (checked when given)
#   tvh.hoff/tvh.hlen       region the host filled before boot; tvh.hmd5 = its md5
#   tvh.goff/tvh.glen       region the guest fills with random bytes (host checks the md5
#                           printed in "TVH-OK blk-write ... md5=")
#   tvh.boff/tvh.bmib       bulk region: N MiB of zeros, O_DIRECT write + fsync, then read
#   tvh.doff/tvh.dlen       region to discard (when the disk offers discard)
#   tvh.rebind=1            at the end, unbind and rebind the virtio_blk driver (the device
#                           is reset, so the backend's rings are stopped and started again),
#                           then read and write through the new rings
# Checks (markers): blk-size, blk-read, blk-write, blk-readback, blk-bulk-write,
# blk-bulk-read, blk-discard (OK, SKIP when not offered, FAIL on error), blk-rebind and
# blk-rebind-io (only with tvh.rebind=1).
K=65536
dev=/dev/${TVH_dev:-vda}
name=${dev#/dev/}
hoff=${TVH_hoff:-0} hlen=${TVH_hlen:-1048576}
goff=${TVH_goff:-2097152} glen=${TVH_glen:-1048576}
boff=${TVH_boff:-4194304} bmib=${TVH_bmib:-16}
doff=${TVH_doff:-$boff} dlen=${TVH_dlen:-1048576}
rc=0

cs() { awk '{ printf "%d", $1 * 100 }' /proc/uptime; }
mibps() { awk -v m="$1" -v c="$2" 'BEGIN { if (c < 1) c = 1; printf "%.1f", m * 100 / c }'; }
md5_of() { md5sum | cut -d' ' -f1; }
oneline() { tr '\n' ' ' <"$1"; }

n=0
while [ ! -b "$dev" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
if [ ! -b "$dev" ]; then
    tvh_fail "blk-size no $dev (block devices: $(ls /sys/block | tr '\n' ' '))"
    return 1
fi

size=$(( $(cat /sys/block/$name/size) * 512 ))
queues=$(ls /sys/block/$name/mq | wc -l)
tvh_info "blk-dev size=$size queues=$queues lbs=$(cat /sys/block/$name/queue/logical_block_size)" \
    "wc=$(cat /sys/block/$name/queue/write_cache | tr ' ' _) ro=$(cat /sys/block/$name/ro)" \
    "features=$(cat /sys/block/$name/device/features 2>/dev/null)"
if [ -n "${TVH_size:-}" ] && [ "$size" != "$TVH_size" ]; then
    tvh_fail "blk-size got=$size want=$TVH_size"; rc=1
else
    tvh_ok "blk-size bytes=$size"
fi

# 1. host -> guest: what the host wrote before boot
got=$(dd if=$dev bs=$K skip=$((hoff / K)) count=$((hlen / K)) iflag=direct 2>/tmp/err | md5_of)
if [ -n "${TVH_hmd5:-}" ] && [ "$got" = "$TVH_hmd5" ]; then
    tvh_ok "blk-read off=$hoff len=$hlen md5=$got"
else
    tvh_fail "blk-read off=$hoff len=$hlen md5=$got want=${TVH_hmd5:-?} $(oneline /tmp/err)"; rc=1
fi

# 2. guest -> host: random bytes, O_DIRECT + fsync, read back past the page cache
dd if=/dev/urandom of=/tmp/g bs=$K count=$((glen / K)) 2>/dev/null
want=$(md5_of </tmp/g)
if dd if=/tmp/g of=$dev bs=$K seek=$((goff / K)) oflag=direct conv=fsync 2>/tmp/err; then
    tvh_ok "blk-write off=$goff len=$glen md5=$want"
    echo 3 >/proc/sys/vm/drop_caches
    got=$(dd if=$dev bs=$K skip=$((goff / K)) count=$((glen / K)) iflag=direct 2>/dev/null | md5_of)
    if [ "$got" = "$want" ]; then tvh_ok "blk-readback md5=$got"
    else tvh_fail "blk-readback md5=$got want=$want"; rc=1; fi
else
    tvh_fail "blk-write $(oneline /tmp/err)"; rc=1
fi

# 3. bulk: 1 MiB requests, timed (the host pre-filled this region with non-zero bytes)
t0=$(cs)
if dd if=/dev/zero of=$dev bs=1048576 seek=$((boff / 1048576)) count=$bmib oflag=direct conv=fsync 2>/tmp/err; then
    t1=$(cs); tvh_ok "blk-bulk-write off=$boff mib=$bmib MiBps=$(mibps $bmib $((t1 - t0)))"
else
    tvh_fail "blk-bulk-write $(oneline /tmp/err)"; rc=1
fi
t0=$(cs)
if dd if=$dev of=/dev/null bs=1048576 skip=$((boff / 1048576)) count=$bmib iflag=direct 2>/tmp/err; then
    t1=$(cs)
    if dd if=$dev bs=1048576 skip=$((boff / 1048576)) count=$bmib iflag=direct 2>/dev/null \
            | cmp -s -n $((bmib * 1048576)) - /dev/zero; then
        tvh_ok "blk-bulk-read mib=$bmib MiBps=$(mibps $bmib $((t1 - t0)))"
    else
        tvh_fail "blk-bulk-read region is not all zeros after the bulk write"; rc=1
    fi
else
    tvh_fail "blk-bulk-read $(oneline /tmp/err)"; rc=1
fi

# 4. discard, when the device offers it
if [ "$(cat /sys/block/$name/queue/discard_max_bytes)" = 0 ]; then
    tvh_skip "blk-discard not offered by the device"
elif blkdiscard -o "$doff" -l "$dlen" $dev 2>/tmp/err; then
    tvh_ok "blk-discard off=$doff len=$dlen"
else
    tvh_fail "blk-discard $(oneline /tmp/err)"; rc=1
fi

# 5. driver unbind + bind: virtio reset, then a fresh initialisation of the same device
if [ "${TVH_rebind:-0}" = 1 ]; then
    vdev=$(basename "$(readlink /sys/block/$name/device)")
    drv=/sys/bus/virtio/drivers/virtio_blk
    if echo "$vdev" >$drv/unbind 2>/tmp/err && [ ! -b "$dev" ] \
            && echo "$vdev" >$drv/bind 2>>/tmp/err; then
        n=0
        while [ ! -b "$dev" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    fi
    if [ -b "$dev" ] && [ "$(basename "$(readlink /sys/block/$name/device)")" = "$vdev" ]; then
        tvh_ok "blk-rebind dev=$vdev"
        # what the host wrote and what we wrote before the reset, then two more writes
        # (zeros, then our bytes again, so the host's check of the region stays valid)
        h=$(dd if=$dev bs=$K skip=$((hoff / K)) count=$((hlen / K)) iflag=direct 2>/dev/null | md5_of)
        g=$(dd if=$dev bs=$K skip=$((goff / K)) count=$((glen / K)) iflag=direct 2>/dev/null | md5_of)
        dd if=/dev/zero of=$dev bs=$K seek=$((goff / K)) count=$((glen / K)) oflag=direct conv=fsync 2>/tmp/err
        z=$(dd if=$dev bs=$K skip=$((goff / K)) count=$((glen / K)) iflag=direct 2>/dev/null \
            | cmp -s -n "$glen" - /dev/zero && echo zero || echo not-zero)
        dd if=/tmp/g of=$dev bs=$K seek=$((goff / K)) oflag=direct conv=fsync 2>>/tmp/err
        g2=$(dd if=$dev bs=$K skip=$((goff / K)) count=$((glen / K)) iflag=direct 2>/dev/null | md5_of)
        if [ "$h" = "${TVH_hmd5:-}" ] && [ "$g" = "$want" ] && [ $z = zero ] && [ "$g2" = "$want" ]; then
            tvh_ok "blk-rebind-io host=$h guest=$g rewritten=$g2"
        else
            tvh_fail "blk-rebind-io host=$h guest=$g zeroed=$z rewritten=$g2 want=$want" \
                "$(oneline /tmp/err)"; rc=1
        fi
    else
        tvh_fail "blk-rebind $vdev did not come back as $dev: $(oneline /tmp/err)"; rc=1
    fi
fi
return $rc
