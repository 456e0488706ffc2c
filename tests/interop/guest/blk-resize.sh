# Guest role "blk-resize": the disk grows while the guest runs (sourced by /init; busybox sh).
# The host waits for "blk-resize-ready", appends to the image, writes a marker sector at
# its new end and tells the backend (trio-vhost blk: SIGHUP), which announces the new
# capacity with CONFIG_CHANGE_MSG; QEMU re-reads the config space and interrupts the
# guest, whose driver updates the disk size. Kernel command line:
#   tvh.dev=vda            the disk
#   tvh.wait=S             how long to wait for the new size (default 60 s)
#   tvh.marker=TEXT        what the host wrote at the start of the last sector
# Checks (markers): blk-resize (the size changed, from/to in sectors), blk-resize-read
# (the last sector, beyond the old end, reads back with the host's marker).
dev=/dev/${TVH_dev:-vda}
name=${dev#/dev/}
wait_s=${TVH_wait:-60}
rc=0

n=0
while [ ! -b "$dev" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
if [ ! -b "$dev" ]; then
    tvh_fail "blk-resize no $dev"
    return 1
fi
size0=$(cat /sys/block/$name/size)
tvh_info "blk-resize-ready sectors=$size0"

size=$size0
n=0
while [ "$size" = "$size0" ] && [ $n -lt $((wait_s * 10)) ]; do
    sleep 0.1
    n=$((n + 1))
    size=$(cat /sys/block/$name/size)
done
if [ "$size" = "$size0" ]; then
    tvh_fail "blk-resize the size stayed $size0 sectors for ${wait_s}s"
    return 1
fi
tvh_ok "blk-resize from=$size0 to=$size after_ds=$n"
tvh_info "blk-resize-dmesg $(dmesg | grep -i 'new size\|capacity' | tail -1 | tr ' ' _)"

got=$(dd if=$dev bs=512 skip=$((size - 1)) count=1 iflag=direct 2>/tmp/err | head -c 32 \
    | tr -cd 'A-Za-z0-9-')
if [ -n "${TVH_marker:-}" ] && [ "$got" = "$TVH_marker" ]; then
    tvh_ok "blk-resize-read marker=$got"
else
    tvh_fail "blk-resize-read got=$got want=${TVH_marker:-?} $(tr '\n' ' ' </tmp/err)"; rc=1
fi
return $rc
