#!/usr/bin/env bash
# Runs clippy on the hv kernel (its own cargo project with kernel build flags, see
# hv/.cargo/config.toml), builds it, and makes a GRUB rescue ISO that boots it through multiboot2
# (BIOS; Bochs and QEMU).
# Output: hv/target/hv.elf and hv/target/hv.iso. Needs grub-pc-bin, grub-common, xorriso, mtools
# (ci/hv-test.sh installs them). Extra cargo args (e.g. --features ...) are passed through.
set -euo pipefail
cd "$(dirname "$0")/../hv"

# Lints first (hv/Cargo.toml denies clippy::undocumented_unsafe_blocks): an unsafe block without
# its SAFETY comment fails the build. Same flags and features as the build below.
cargo clippy --release --locked "$@"
cargo build --release --locked "$@"
elf=target/x86_64-unknown-linux-gnu/release/hv
grub-file --is-x86-multiboot2 "$elf" || { echo "build-hv: $elf is not a multiboot2 kernel" >&2; exit 1; }

iso_dir=target/iso
rm -rf "$iso_dir"
mkdir -p "$iso_dir/boot/grub"
cp "$elf" target/hv.elf
cp "$elf" "$iso_dir/boot/hv.elf"
cat > "$iso_dir/boot/grub/grub.cfg" <<'CFG'
set timeout=0
set default=0
menuentry "hv" {
    multiboot2 /boot/hv.elf
    boot
}
CFG
grub-mkrescue -o target/hv.iso "$iso_dir" >target/grub-mkrescue.log 2>&1 \
    || { cat target/grub-mkrescue.log >&2; echo "build-hv: grub-mkrescue failed" >&2; exit 1; }
echo "build-hv: hv/target/hv.iso ($(stat -c %s target/hv.iso) bytes)"
