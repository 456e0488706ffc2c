# Guest role "blk-ro": a vhost-user-blk disk the backend exports read-only (sourced by
# /init; busybox sh). The host fills a region with random bytes before boot, puts a swap
# area (mkswap format, tvh.swap pages, non-zero filler) at the start of the image, and
# checks after poweroff that the image is byte-for-byte unchanged. Kernel command line:
#   tvh.dev=vda             the disk
#   tvh.hoff/tvh.hlen       region the host filled; tvh.hmd5 = its md5 (multiples of 64 KiB)
#   tvh.woff                where the dd write attempts go (default tvh.hoff, so that a
#                           write that got through would also change what we read back)
#   tvh.swap=1              the host put a swap area at offset 0 (else no forced write)
# Checks (markers):
#   blk-ro-flag           the kernel sees the disk read-only (/sys/block/<dev>/ro = 1)
#   blk-ro-read           the host's bytes read back (O_DIRECT)
#   blk-ro-write-refused  an ordinary O_DIRECT write fails
#   blk-ro-forced-write   a WRITE the block layer did send to the device came back with an
#                         I/O error from the device (see below for how it gets sent)
#   blk-ro-discard        the BLKDISCARD ioctl fails (SKIP when no discard is offered)
#   blk-ro-reread         the host's bytes still read back, past the page cache
#
# Forcing a write to the device. First what the issue suggests, `blockdev --setrw` and an
# O_DIRECT dd; but since Linux 5.12 the driver's read-only flag (virtio-blk with
# VIRTIO_BLK_F_RO) survives --setrw, so the dd fails with EPERM before a request is built.
# The 6.1 kernel also refuses writable shared mmaps (EINVAL) and every discard (the ioctl,
# and blkdev_issue_discard itself, EPERM) on a read-only disk. Swap-out does not check: we
# swapon the disk and let cgroup v2's memory.reclaim push a tmpfs file of ours out to swap.
# The block layer only warns ("Trying to write to read-only block-device") and sends the
# WRITEs; the device must fail them, which the kernel logs as
# "I/O error, dev <dev>, sector N op 0x1:(WRITE)" (and "Write-error on swap-device").
K=65536
dev=/dev/${TVH_dev:-vda}
name=${dev#/dev/}
hoff=${TVH_hoff:-0} hlen=${TVH_hlen:-1048576}
woff=${TVH_woff:-$hoff}
rc=0

md5_of() { md5sum | cut -d' ' -f1; }
oneline() { tr '\n' ' ' <"$1"; }
host_md5() {
    dd if=$dev bs=$K skip=$((hoff / K)) count=$((hlen / K)) iflag=direct 2>/tmp/err | md5_of
}

n=0
while [ ! -b "$dev" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
if [ ! -b "$dev" ]; then
    tvh_fail "blk-ro-flag no $dev (block devices: $(ls /sys/block | tr '\n' ' '))"
    return 1
fi
tvh_info "blk-dev size=$(( $(cat /sys/block/$name/size) * 512 )) ro=$(cat /sys/block/$name/ro)" \
    "discard_max=$(cat /sys/block/$name/queue/discard_max_bytes)" \
    "features=$(cat /sys/block/$name/device/features 2>/dev/null)"

if [ "$(cat /sys/block/$name/ro)" = 1 ]; then
    tvh_ok "blk-ro-flag ro=1"
else
    tvh_fail "blk-ro-flag ro=$(cat /sys/block/$name/ro) (VIRTIO_BLK_F_RO not offered?)"; rc=1
fi

got=$(host_md5)
if [ -n "${TVH_hmd5:-}" ] && [ "$got" = "$TVH_hmd5" ]; then
    tvh_ok "blk-ro-read off=$hoff len=$hlen md5=$got"
else
    tvh_fail "blk-ro-read md5=$got want=${TVH_hmd5:-?} $(oneline /tmp/err)"; rc=1
fi

# 1. an ordinary write: must fail (the kernel refuses it, or the device does)
dd if=/dev/urandom of=/tmp/w bs=$K count=1 2>/dev/null
if dd if=/tmp/w of=$dev bs=$K seek=$((woff / K)) count=1 oflag=direct 2>/tmp/err; then
    tvh_fail "blk-ro-write-refused an O_DIRECT write to the read-only disk succeeded"; rc=1
else
    tvh_ok "blk-ro-write-refused err=$(grep -o '[A-Z][a-z /-]*$' /tmp/err | tail -1 | tr ' ' _)"
fi

# 2. make the block layer send a write anyway
write_errors() {  # kernel log lines: the device failed a WRITE to our disk (S_IOERR)
    dmesg | grep -c "I/O error, dev $name, sector [0-9]* op 0x1:(WRITE)"
}
writes0=$(write_errors)
forced=""
blockdev --setrw $dev 2>/tmp/err || tvh_info "blk-ro-setrw failed: $(oneline /tmp/err)"
tvh_info "blk-ro-setrw sysfs_ro=$(cat /sys/block/$name/ro) getro=$(blockdev --getro $dev)"
if dd if=/tmp/w of=$dev bs=$K seek=$((woff / K)) count=1 oflag=direct 2>/tmp/err; then
    tvh_fail "blk-ro-forced-write after --setrw an O_DIRECT write succeeded: the device took it"
    rc=1; forced=done
elif grep -q "I/O error" /tmp/err; then
    forced=dd
else
    tvh_info "blk-ro-setrw-dd refused before reaching the device: $(oneline /tmp/err)"
fi
blockdev --setro $dev 2>/dev/null
if [ -z "$forced" ] && [ "${TVH_swap:-0}" = 1 ]; then
    if swapon $dev 2>/tmp/err; then
        tvh_info "blk-ro-swap $(tail -n +2 /proc/swaps | tr -s ' \t' ' ')"
        cg=/sys/fs/cgroup
        mount -t cgroup2 cgroup2 $cg && echo +memory >$cg/cgroup.subtree_control \
            && mkdir -p $cg/tvh || tvh_info "blk-ro-swap no memory cgroup"
        # 1 MiB of tmpfs pages charged to cgroup tvh, then ask the kernel to reclaim them:
        # they can only go to swap (reclaim fails, EAGAIN: the device refused every write)
        sh -c "echo \$\$ >$cg/tvh/cgroup.procs && exec dd if=/dev/urandom of=/tmp/swapme \
            bs=$K count=16 2>/dev/null"
        echo 1M >$cg/tvh/memory.reclaim 2>/tmp/err
        tvh_info "blk-ro-swap reclaim: $(oneline /tmp/err) $(grep -E 'pswpout' /proc/vmstat)"
        rm -f /tmp/swapme
        swapoff $dev 2>/tmp/err || tvh_info "blk-ro-swap swapoff: $(oneline /tmp/err)"
        forced=swap
    else
        tvh_info "blk-ro-swap swapon failed: $(oneline /tmp/err)"
    fi
fi
writes1=$(write_errors)
if [ "$forced" = done ]; then
    :
elif [ -n "$forced" ] && [ "$writes1" -gt "$writes0" ]; then
    tvh_ok "blk-ro-forced-write via=$forced device_write_errors=$((writes1 - writes0))"
else
    tvh_fail "blk-ro-forced-write via=${forced:-none}: no WRITE came back from the device" \
        "with an I/O error (kernel log: $writes0 -> $writes1)"; rc=1
fi

# 3. the discard ioctl, when discard is offered: must fail too (the kernel refuses it)
if [ "$(cat /sys/block/$name/queue/discard_max_bytes)" = 0 ]; then
    tvh_skip "blk-ro-discard not offered by the device"
elif blkdiscard -o "$woff" -l $K $dev 2>/tmp/err; then
    tvh_fail "blk-ro-discard a discard on the read-only disk succeeded"; rc=1
else
    tvh_ok "blk-ro-discard err=$(oneline /tmp/err | tr ' ' _)"
fi

# 4. nothing changed, as far as the guest can tell
echo 3 >/proc/sys/vm/drop_caches
got=$(host_md5)
if [ "$got" = "${TVH_hmd5:-}" ]; then
    tvh_ok "blk-ro-reread md5=$got"
else
    tvh_fail "blk-ro-reread md5=$got want=${TVH_hmd5:-?} $(oneline /tmp/err)"; rc=1
fi
return $rc
