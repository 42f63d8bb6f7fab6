#!/usr/bin/env bash
# The files of hv's Linux guest (issue 17), in hv/target/linux/:
#   vmlinuz     Debian's kernel, from the linux-image-amd64 package (apt-get download +
#               dpkg-deb -x: nothing is installed into this machine's /boot);
#   initrd.img  an initramfs of Debian's busybox-static and hv/linux-guest/init (cpio newc, gzip);
#   hv-linux.iso, hv-linux-refused.iso
#               GRUB ISOs booting hv (hv/target/hv.elf, from ci/build-hv.sh) with the kernel and
#               the initramfs as multiboot2 modules; the second asks the guest to touch hv's
#               memory (hvtest=touch-hv), which hv must refuse.
#   cmdline     the kernel command line both ISOs and the plain-QEMU comparison run use.
# The downloads are kept (keyed by package version); the initramfs and ISOs are rebuilt every run.
# Needs apt-get (network), dpkg-deb, cpio, gzip, grub-mkrescue (ci/hv-test.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
out=hv/target/linux
mkdir -p "$out/debs"

# The kernel package the metapackage names today, and busybox-static.
kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
kpkg=$(kernel_pkg)
if [ -z "$kpkg" ]; then
    # A fresh machine may have no package lists yet.
    apt-get update -qq
    kpkg=$(kernel_pkg)
fi
[ -n "$kpkg" ] || { echo "linux-guest: apt knows no linux-image-amd64 package" >&2; exit 1; }
fetch() { # PACKAGE -> path of its .deb in $out/debs
    local pkg=$1 ver deb
    ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
    deb=$(ls "$out/debs/${pkg}_"*.deb 2>/dev/null | grep -F "_$(echo "$ver" | sed 's/:/%3a/')_" | head -1 || true)
    if [ -z "$deb" ]; then
        rm -f "$out/debs/${pkg}_"*.deb
        (cd "$out/debs" && apt-get download "$pkg" >/dev/null 2>&1) \
            || { echo "linux-guest: apt-get download $pkg failed" >&2; exit 1; }
        deb=$(ls "$out/debs/${pkg}_"*.deb | head -1)
    fi
    echo "$deb"
}
kdeb=$(fetch "$kpkg")
bdeb=$(fetch busybox-static)

rm -rf "$out/kernel" "$out/busybox" "$out/root"
dpkg-deb -x "$kdeb" "$out/kernel"
dpkg-deb -x "$bdeb" "$out/busybox"
cp "$(ls "$out"/kernel/boot/vmlinuz-* | head -1)" "$out/vmlinuz"

mkdir -p "$out/root/bin" "$out/root/dev" "$out/root/proc"
cp "$out/busybox/bin/busybox" "$out/root/bin/busybox"
cp hv/linux-guest/init "$out/root/init"
chmod 755 "$out/root/init" "$out/root/bin/busybox"
(cd "$out/root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -9 > "$out/initrd.img"

cmdline="console=ttyS0 nokaslr panic=-1"
echo "$cmdline" > "$out/cmdline"
[ -f hv/target/hv.elf ] || { echo "linux-guest: hv/target/hv.elf is missing (run ci/build-hv.sh)" >&2; exit 1; }
iso() { # NAME EXTRA_CMDLINE
    local dir="$out/iso-$1"
    rm -rf "$dir"; mkdir -p "$dir/boot/grub"
    cp hv/target/hv.elf "$dir/boot/hv.elf"
    cp "$out/vmlinuz" "$dir/boot/vmlinuz"
    cp "$out/initrd.img" "$dir/boot/initrd.img"
    cat > "$dir/boot/grub/grub.cfg" <<CFG
set timeout=0
set default=0
menuentry "hv: Linux guest" {
    multiboot2 /boot/hv.elf
    module2 /boot/vmlinuz $cmdline$2
    module2 /boot/initrd.img initramfs
    boot
}
CFG
    grub-mkrescue -o "$out/$1.iso" "$dir" >"$out/$1-mkrescue.log" 2>&1 \
        || { cat "$out/$1-mkrescue.log" >&2; echo "linux-guest: grub-mkrescue failed" >&2; exit 1; }
}
iso hv-linux ""
iso hv-linux-refused " hvtest=touch-hv iomem=relaxed"
echo "linux-guest: $(basename "$kdeb") + $(basename "$bdeb"); vmlinuz $(stat -c %s "$out/vmlinuz") bytes, initrd.img $(stat -c %s "$out/initrd.img") bytes; ISOs in $out"
