# Guest role "blk-stream": a long stream of self-describing 4 KiB blocks written to the
# disk while the host kills and restarts the vhost-user-blk backend (QEMU reconnects).
# Kernel command line knobs:
#   tvh.dev=vda        the disk
#   tvh.chunks=N       how many 1 MiB chunks to write (256 blocks each), one dd per chunk,
#                      O_DIRECT + fsync, one 1 MiB write (several requests in flight)
# Block i holds "B%014d\n" (16 bytes) followed by 4080 bytes of "x": the host checks every
# block of the image, so a lost, repeated or misplaced write shows up.
# Markers: INFO blk-stream-chunk n=I after each chunk; OK/FAIL blk-stream.
dev=/dev/${TVH_dev:-vda}
chunks=${TVH_chunks:-32}
n=0
while [ ! -b "$dev" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
if [ ! -b "$dev" ]; then
    tvh_fail "blk-stream no $dev"
    return 1
fi
c=0
while [ $c -lt "$chunks" ]; do
    awk -v c="$c" 'BEGIN {
        pad = sprintf("%4080s", ""); gsub(/ /, "x", pad)
        for (i = c * 256; i < (c + 1) * 256; i++) printf "B%014d\n%s", i, pad
    }' >/tmp/chunk
    if ! dd if=/tmp/chunk of="$dev" bs=1048576 seek="$c" oflag=direct conv=fsync \
            2>/tmp/err; then
        tvh_fail "blk-stream chunk $c: $(tr '\n' ' ' </tmp/err)"
        return 1
    fi
    tvh_info "blk-stream-chunk n=$c uptime=$(tvh_uptime)"
    c=$((c + 1))
done
tvh_ok "blk-stream chunks=$chunks"
