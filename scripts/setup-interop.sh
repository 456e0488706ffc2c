#!/usr/bin/env bash
# Prepare the host for trio_vhost's interop tests (tests/interop). Debian 12, idempotent,
# non-interactive (never reads stdin). Needs root (or sudo) only for the apt step.
#
#   bash scripts/setup-interop.sh                 everything (packages, kernel, initramfs)
#   bash scripts/setup-interop.sh --no-apt        skip the package step (kernel + initramfs)
#   bash scripts/setup-interop.sh --initramfs-only   only rebuild the guest initramfs images
#                                                 (no root, no network; the test harness runs
#                                                 this itself when a guest script changed)
#
# What it does (each step is skipped when its result is already there):
#  1. apt-get install --no-install-recommends: qemu-system-x86 (brings qemu-system-common,
#     which ships qemu-storage-daemon), qemu-utils, busybox-static, and DPDK 22.11's testpmd:
#     dpdk-dev (Debian 12 puts dpdk-testpmd there, not in 'dpdk') plus the PMD plugins it
#     loads at run time: librte-net-vhost23, librte-net-virtio23, librte-mempool-ring23.
#  2. `apt-get download`s the Debian kernel that linux-image-$FLAVOUR depends on, unpacks it
#     with dpkg -x into the cache (nothing is installed into /boot), keeps vmlinuz, its config
#     and the virtio .ko files (Debian builds virtio_pci/virtio_blk/virtio_net as modules),
#     and writes their load order (dependencies first, from each module's depends= string).
#  3. Builds one gzip'd newc initramfs per guest role, for each tests/interop/guest/<role>.sh:
#     static busybox + the modules + tests/interop/guest/init (PID 1) + the role script.
#     A <role>.inputs file records the sha256 of every input; the image is rebuilt only when
#     that changes.
#
# Env:
#   TRIO_VHOST_INTEROP_DIR      cache dir (default: <repo>/var/interop; var/ is gitignored)
#   TRIO_VHOST_INTEROP_KFLAVOUR kernel flavour (default cloud-amd64; "amd64" = generic kernel)
set -euo pipefail
exec </dev/null

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${TRIO_VHOST_INTEROP_DIR:-$REPO/var/interop}
FLAVOUR=${TRIO_VHOST_INTEROP_KFLAVOUR:-cloud-amd64}
GUEST_SRC=$REPO/tests/interop/guest
DO_APT=1 DO_KERNEL=1
for arg in "$@"; do
    case "$arg" in
        --no-apt) DO_APT=0 ;;
        --initramfs-only) DO_APT=0 DO_KERNEL=0 ;;
        -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "setup-interop: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

T0=$(date +%s.%N)
say() { echo "setup-interop: $*"; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

SUDO=()
if [[ $(id -u) != 0 ]]; then
    if command -v sudo >/dev/null; then SUDO=(sudo -n); fi
fi
APT=(env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300)
APT_UPDATED=0
apt_update() {
    if ((APT_UPDATED == 0)); then
        say "apt-get update"
        "${SUDO[@]}" "${APT[@]}" update -qq
        APT_UPDATED=1
    fi
}

# ---- 1. packages --------------------------------------------------------------------------
PACKAGES=(qemu-system-x86 qemu-system-common qemu-utils busybox-static
          dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23)
if ((DO_APT)); then
    missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) != 0 && ${#SUDO[@]} == 0 ]]; then
            echo "setup-interop: need root or sudo to install: ${missing[*]}" >&2; exit 1
        fi
        apt_update      # always refresh first: stale lists give 404s on a fresh machine
        say "apt-get install ${missing[*]}"
        "${SUDO[@]}" "${APT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        say "installed ${#missing[@]} package(s) ($(elapsed) s)"
    else
        say "packages already installed"
    fi
fi

# ---- 2. guest kernel -----------------------------------------------------------------------
KDIR=$DIR/kernel
MODULES=(virtio_pci virtio_blk virtio_net virtio_rng)   # dependencies are added from modinfo
if ((DO_KERNEL)); then
    if [[ -s $KDIR/vmlinuz && -s $KDIR/modules.order && -s $KDIR/package
          && "$(cat "$KDIR/wanted" 2>/dev/null)" == "${MODULES[*]}" ]]; then
        say "kernel already there: $(cat "$KDIR/package")"
    else
        command -v dpkg-deb >/dev/null || { echo "setup-interop: dpkg-deb missing" >&2; exit 1; }
        pick() { apt-cache depends "linux-image-$FLAVOUR" 2>/dev/null \
                     | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'; }
        pkg=$(pick)
        if [[ -z $pkg ]]; then apt_update; pkg=$(pick); fi
        [[ -n $pkg ]] || { echo "setup-interop: no package for linux-image-$FLAVOUR" >&2; exit 1; }
        stage=$(mktemp -d "$DIR/kernel.tmp.XXXXXX")
        trap 'rm -rf "$stage"' EXIT
        mkdir -p "$stage/deb" "$stage/root" "$stage/out/modules"
        say "apt-get download $pkg"
        (cd "$stage/deb" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null)
        dpkg-deb -x "$stage"/deb/*.deb "$stage/root"
        cp "$stage"/root/boot/vmlinuz-* "$stage/out/vmlinuz"
        cp "$stage"/root/boot/config-* "$stage/out/config"
        moddir=$(echo "$stage"/root/lib/modules/*)
        # Resolve the load order (dependencies first). Built-in (=y) drivers have no .ko.
        order=()
        add_module() {
            local m=$1 f deps d
            for d in "${order[@]}"; do [[ $d == "$m" ]] && return 0; done
            # Module names treat - and _ alike; the files use either (virtio-rng.ko).
            local h=${m//_/-}
            f=$(find "$moddir" \( -name "$m.ko*" -o -name "$h.ko*" \) | head -1)
            if [[ -z $f ]]; then
                local sym=CONFIG_$(echo "$m" | tr a-z A-Z)
                grep -q "^$sym=y" "$stage/out/config" && return 0
                echo "setup-interop: module $m not found in $pkg" >&2; exit 1
            fi
            case "$f" in
                *.xz) xz -dc "$f" >"$stage/out/modules/$m.ko" ;;
                *.zst) zstd -qdc "$f" >"$stage/out/modules/$m.ko" ;;
                *) cp "$f" "$stage/out/modules/$m.ko" ;;
            esac
            # The .modinfo section holds NUL-separated "key=value" strings (no kmod needed).
            deps=$(tr '\0' '\n' <"$stage/out/modules/$m.ko" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
            for d in $deps; do add_module "$d"; done
            order+=("$m")
        }
        for m in "${MODULES[@]}"; do add_module "$m"; done
        printf '%s\n' "${order[@]}" >"$stage/out/modules.order"
        echo "${MODULES[*]}" >"$stage/out/wanted"
        echo "$pkg" >"$stage/out/package"
        rm -rf "$KDIR"
        mv "$stage/out" "$KDIR"
        rm -rf "$stage"; trap - EXIT
        say "kernel $pkg unpacked; modules (load order): ${order[*]} ($(elapsed) s)"
    fi
fi

# ---- 3. initramfs per guest role -------------------------------------------------------------
BUSYBOX=/bin/busybox
[[ -x $BUSYBOX ]] || { echo "setup-interop: $BUSYBOX missing (busybox-static)" >&2; exit 1; }
[[ -s $KDIR/modules.order ]] || { echo "setup-interop: no kernel in $KDIR: run without --initramfs-only" >&2; exit 1; }
mkdir -p "$DIR/initramfs"
built=0
for script in "$GUEST_SRC"/*.sh; do
    role=$(basename "$script" .sh)
    out=$DIR/initramfs/$role.cpio.gz
    # Inputs fingerprint; tests/interop/harness.py computes the same list to detect staleness.
    inputs=$( (cd "$GUEST_SRC" && sha256sum init "$role.sh") ; sha256sum "$BUSYBOX" | cut -d' ' -f1;
              cat "$KDIR/package"; paste -sd' ' "$KDIR/modules.order")
    if [[ -s $out && -f $DIR/initramfs/$role.inputs ]] && [[ $(cat "$DIR/initramfs/$role.inputs") == "$inputs" ]]; then
        continue
    fi
    stage=$(mktemp -d "$DIR/initramfs/$role.tmp.XXXXXX")
    mkdir -p "$stage"/{bin,dev,proc,sys,tmp,run,etc/tvh,lib/modules}
    cp "$BUSYBOX" "$stage/bin/busybox"
    ln -s busybox "$stage/bin/sh"
    install -m 0755 "$GUEST_SRC/init" "$stage/init"
    install -m 0755 "$script" "$stage/etc/tvh/role.sh"
    echo "$role" >"$stage/etc/tvh/role"
    cp "$KDIR"/modules/*.ko "$stage/lib/modules/" 2>/dev/null || true
    cp "$KDIR/modules.order" "$stage/etc/tvh/modules"
    # No device nodes needed: the kernel's built-in initramfs already has /dev/console, and
    # /init mounts devtmpfs. So this step runs without root.
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null) \
        | gzip -6 >"$out.tmp"
    mv "$out.tmp" "$out"
    echo "$inputs" >"$DIR/initramfs/$role.inputs"
    rm -rf "$stage"
    say "built $out ($(stat -c %s "$out") bytes)"
    built=$((built + 1))
done
((built)) || say "initramfs images up to date"

{
    echo "kernel=$(cat "$KDIR/package")"
    echo "qemu=$(qemu-system-x86_64 --version 2>/dev/null | head -1 || echo missing)"
    echo "testpmd=$(command -v dpdk-testpmd || echo missing)"
    echo "busybox=$("$BUSYBOX" 2>&1 | head -1)"
} >"$DIR/versions.txt"
say "cache: $DIR ($(du -sh "$DIR" | cut -f1)); done in $(elapsed) s"
