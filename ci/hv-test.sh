#!/usr/bin/env bash
# Boots the hv kernel under QEMU TCG (AMD SVM + NPT backend; GRUB ISO and PVH -kernel) and under
# Bochs (Intel VMX + EPT backend with a Haswell model; SVM + NPT again with the Ryzen model), and
# fails unless each run's serial output holds the expected verdict and figures. Then boots
# Debian's Linux kernel as hv's guest under QEMU TCG (SVM + NPT; files from ci/linux-guest.sh),
# the same kernel and initramfs on plain QEMU TCG for the time ratio, and the refused-access run.
# Installs the emulators and ISO tools through apt-get when missing (root, Debian 12).
# Never skips: a missing tool that cannot be installed is a failure.
# --no-install: do not call apt-get (the cargo test wrapper tests/tests/hv_boot.rs uses it after
# checking the tools itself); a missing tool is then still a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)

if [ "${1:-}" != "--no-install" ]; then
    ci/setup.sh qemu-system-x86 bochs bochsbios vgabios bochs-term grub-pc-bin grub-common xorriso mtools bc cpio
fi
for tool in qemu-system-x86_64 bochs grub-mkrescue grub-file xorriso mformat bc cpio dpkg-deb apt-get; do
    command -v "$tool" >/dev/null || { echo "hv-test: $tool is missing" >&2; exit 1; }
done
# One run at a time on this checkout: concurrent runs (e.g. two `cargo test --workspace`) would
# share hv/target/iso, hv/target/hv.iso and the run directory.
mkdir -p hv/target
exec 9>hv/target/.hv-test.lock
flock 9

out=hv/target/run
rm -rf "$out"; mkdir -p "$out"
s=$(date +%s)
if ! ci/build-hv.sh >"$out/build.log" 2>&1; then
    cat "$out/build.log" >&2
    echo "hv-test: kernel build failed" >&2
    exit 1
fi
grep -E "^build-hv" "$out/build.log"
echo "hv-test: build + ISO in $(( $(date +%s) - s )) s"
iso=$(realpath hv/target/hv.iso)
fail=0

# check NAME FILE PATTERN...: every pattern (grep -E) must appear in FILE.
check() {
    local name=$1 file=$2; shift 2
    local p ok=1
    for p in "$@"; do
        if ! grep -qE -- "$p" "$file"; then
            echo "hv-test: $name: missing expected line /$p/" >&2
            ok=0
        fi
    done
    if grep -qE "HV-VERDICT: FAIL|CHECK FAILED|HOST EXCEPTION|HYPERVISOR PANIC" "$file"; then ok=0; fi
    if [ $ok = 1 ]; then
        echo "hv-test: $name: PASS"
    else
        echo "hv-test: $name: FAIL; serial output follows" >&2
        sed 's/^/    | /' "$file" >&2
        fail=1
    fi
}

# Lines both backends must print (the scenario is the same; only the hardware differs).
common=(
    "scenario: 3 guests loaded; second-level tables empty"
    "guest rogue-oob stopped: second-level fault not resolvable: no mapping covers .*GPA 0x30000000"
    "guest rogue-ro stopped: second-level fault not resolvable: access denied .*WRITE.*GPA 0x10000"
    "guest rogue-misconfig stopped: second-level table entry malformed: .* at GPA 0x100000"
    "guest main says \\(port 0xE9\\): filled 32 data pages and wrote all 4096 pages of BIG, asking to fork"
    "fork: main -> main.child1, main.child2"
    "check ok: the fork write-protected BIG through upper entries: 4096 of 4096 leaves untouched"
    "fork: a guest with 4128 pages written forked in [0-9]+ us \\(first\\) and [0-9]+ us \\(second\\)"
    "fork: main.child1 data pages: 12 copied, 20 shared with the parent"
    "fork: main.child2 data pages: 12 copied, 20 shared with the parent"
    "isolation: OK"
    "HV-VERDICT: PASS .*fork-written-pages=4128 fork-first-us=[0-9]+ fork-later-us=[0-9]+ leaf-walk-us=[0-9]+ fork-leaves-untouched=4096"
)

echo "== hv-test: QEMU TCG, -cpu qemu64,+svm,+npt (SVM/NPT backend)"
s=$(date +%s.%N)
rc=0
timeout 120 qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt -m 128 -cdrom "$iso" -boot d \
    -display none -serial "file:$out/qemu-serial.txt" -monitor none -no-reboot \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 </dev/null >"$out/qemu-stdout.txt" 2>&1 || rc=$?
echo "hv-test: qemu exit status $rc (33 = pass via isa-debug-exit) in $(echo "$(date +%s.%N) - $s" | bc) s"
touch "$out/qemu-serial.txt"
[ $rc = 33 ] || { echo "hv-test: qemu: unexpected exit status $rc" >&2; fail=1; }
check qemu "$out/qemu-serial.txt" "${common[@]}" "boot protocol: multiboot2" "backend: svm" "malformed: NPF with reserved bits" "HV-VERDICT: PASS backend=svm"

echo "== hv-test: QEMU TCG -kernel (PVH entry, no GRUB), SVM/NPT backend"
s=$(date +%s.%N)
rc=0
timeout 120 qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt -m 128 -kernel hv/target/hv.elf \
    -display none -serial "file:$out/qemu-pvh-serial.txt" -monitor none -no-reboot \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 </dev/null >"$out/qemu-pvh-stdout.txt" 2>&1 || rc=$?
echo "hv-test: qemu (PVH) exit status $rc in $(echo "$(date +%s.%N) - $s" | bc) s"
touch "$out/qemu-pvh-serial.txt"
[ $rc = 33 ] || { echo "hv-test: qemu (PVH): unexpected exit status $rc" >&2; fail=1; }
check qemu-pvh "$out/qemu-pvh-serial.txt" "${common[@]}" "boot protocol: PVH" "backend: svm" "HV-VERDICT: PASS backend=svm"

# timed_qemu NAME LIMIT QEMU_ARGS...: runs QEMU (serial to $out/NAME-serial.txt, isa-debug-exit)
# for at most LIMIT seconds; sets qrc (exit status), t_init (seconds until the guest's
# "GUEST-INIT: linux" line appeared, or "none") and t_total.
timed_qemu() {
    local name=$1 limit=$2; shift 2
    local serial="$out/$name-serial.txt" s pid
    : > "$serial"
    s=$(date +%s.%N)
    timeout "$limit" qemu-system-x86_64 "$@" -display none -serial "file:$serial" -monitor none \
        -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04 </dev/null >"$out/$name-stdout.txt" 2>&1 &
    pid=$!
    t_init=none
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$t_init" = none ] && grep -q "GUEST-INIT: linux" "$serial"; then
            t_init=$(echo "$(date +%s.%N) - $s" | bc)
        fi
        sleep 0.05
    done
    qrc=0
    wait "$pid" || qrc=$?
    t_total=$(echo "$(date +%s.%N) - $s" | bc)
    if [ "$t_init" = none ] && grep -q "GUEST-INIT: linux" "$serial"; then t_init=$t_total; fi
    echo "hv-test: $name: exit status $qrc in $t_total s (the /init line after $t_init s)"
}

echo "== hv-test: Linux guest files (Debian's linux-image-amd64 and busybox-static; ci/linux-guest.sh)"
if ! ci/linux-guest.sh >"$out/linux-guest.log" 2>&1; then
    cat "$out/linux-guest.log" >&2
    echo "hv-test: preparing the Linux guest failed" >&2
    exit 1
fi
tail -1 "$out/linux-guest.log"
lx=hv/target/linux
lx_cmdline=$(cat "$lx/cmdline")

echo "== hv-test: Linux on plain QEMU TCG (no hv): the reference time"
timed_qemu linux-plain 120 -accel tcg -cpu qemu64,+svm,+npt -m 512 -kernel "$lx/vmlinuz" \
    -initrd "$lx/initrd.img" -append "$lx_cmdline"
plain_init=$t_init
[ "$qrc" = 33 ] || { echo "hv-test: linux-plain: unexpected exit status $qrc" >&2; fail=1; }
check linux-plain "$out/linux-plain-serial.txt" "GUEST-INIT: linux .* reached /init: MemTotal"

echo "== hv-test: Linux as hv's guest, QEMU TCG -cpu qemu64,+svm,+npt (SVM/NPT backend)"
timed_qemu linux-hv 180 -accel tcg -cpu qemu64,+svm,+npt -m 512 -cdrom "$lx/hv-linux.iso" -boot d
hv_init=$t_init
[ "$qrc" = 33 ] || { echo "hv-test: linux-hv: unexpected exit status $qrc" >&2; fail=1; }
check linux-hv "$out/linux-hv-serial.txt" "boot protocol: multiboot2" "scenario: linux" \
    "linux: bzImage [0-9]+ KiB \(boot protocol 2\.[0-9]+" \
    "linux: guest RAM [0-9]+ MiB .*installed on fault.*hv window \[0x100000, 0x[0-9a-f]+\) reserved" \
    "GUEST-INIT: linux .* reached /init: MemTotal: [0-9]+ kB; vendor_id: AuthenticAMD" \
    "linux: guest exit: /init wrote 0x10 to the debug-exit port" \
    "linux: NPFs [0-9]+ resolved \([1-9][0-9]* with a 2 MiB leaf, [0-9]+ with 4 KiB\), 0 refused" \
    "linux: installed [0-9]+ of [0-9]+ guest RAM pages" \
    "HV-VERDICT: PASS linux: the kernel booted to /init"
if [ "$plain_init" != none ] && [ "$hv_init" != none ]; then
    echo "hv-test: linux: the /init line after $hv_init s under hv vs $plain_init s on plain QEMU TCG: ratio $(echo "scale=2; $hv_init / $plain_init" | bc)"
fi
grep -E "^linux: (NPFs|installed|guest exit)" "$out/linux-hv-serial.txt" | sed 's/^/hv-test: linux-hv: /'

echo "== hv-test: Linux guest touching hv's memory (hvtest=touch-hv): refused"
timed_qemu linux-hv-refused 180 -accel tcg -cpu qemu64,+svm,+npt -m 512 -cdrom "$lx/hv-linux-refused.iso" -boot d
[ "$qrc" = 33 ] || { echo "hv-test: linux-hv-refused: unexpected exit status $qrc" >&2; fail=1; }
check linux-hv-refused "$out/linux-hv-refused-serial.txt" "GUEST-INIT: reading hv's memory at 0x100000" \
    "linux: guest stopped: second-level fault refused at GPA 0x100000 \(NotFound; inside hv's window\)" \
    "HV-VERDICT: PASS linux-refused"
if grep -q "the read of hv's memory returned" "$out/linux-hv-refused-serial.txt"; then
    echo "hv-test: linux-hv-refused: the guest read hv's memory" >&2
    fail=1
fi

# bochs_run NAME MODEL ISO MEGS LIMIT PATTERN...: boots ISO in Bochs with CPU model MODEL and
# MEGS MiB of RAM for at most LIMIT seconds.
bochs_run() {
    local name=$1 model=$2 image=$3 megs=$4 limit=$5; shift 5
    cat > "$out/$name.bochsrc" <<BXRC
megs: $megs
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest
cpu: model=$model, count=1, ips=100000000, reset_on_triple_fault=0
clock: sync=none, time0=local
ata0-master: type=cdrom, path=$image, status=inserted
boot: cdrom
display_library: rfb, options="timeout=0"
com1: enabled=1, mode=file, dev=$out/$name-serial.txt
port_e9_hack: enabled=1
log: $out/$name-log.txt
panic: action=fatal
error: action=report
info: action=report
debug: action=ignore
BXRC
    echo c > "$out/bochs.rc"
    local s rc=0
    s=$(date +%s.%N)
    timeout "$limit" bochs -q -f "$out/$name.bochsrc" -rc "$out/bochs.rc" </dev/null >"$out/$name-stdout.txt" 2>&1 || rc=$?
    echo "hv-test: $name exit status $rc (1 is normal: the shutdown port) in $(echo "$(date +%s.%N) - $s" | bc) s"
    touch "$out/$name-serial.txt"
    [ $rc = 124 ] && { echo "hv-test: $name timed out" >&2; fail=1; }
    grep -q "Shutdown port: shutdown requested" "$out/$name-log.txt" 2>/dev/null \
        || { echo "hv-test: $name did not end through the shutdown port; log tail:" >&2; tail -20 "$out/$name-log.txt" >&2 || true; fail=1; }
    check "$name" "$out/$name-serial.txt" "$@"
}

echo "== hv-test: Bochs, cpu model corei7_haswell_4770 (VMX/EPT backend)"
bochs_run bochs corei7_haswell_4770 "$iso" 128 180 "${common[@]}" "boot protocol: multiboot2" "backend: vmx" "vmx: VMXON ok" \
    "malformed: EPT misconfiguration \\(exit 49\\)" "HV-VERDICT: PASS backend=vmx"

echo "== hv-test: Bochs, cpu model ryzen (SVM/NPT backend on a second SVM implementation: NRIPS, FlushByAsid)"
bochs_run bochs-ryzen ryzen "$iso" 128 180 "${common[@]}" "boot protocol: multiboot2" "backend: svm" "NRIPS=true, FlushByAsid=true" \
    "malformed: NPF with reserved bits" "HV-VERDICT: PASS backend=svm"

echo "== hv-test: Linux as hv's guest on Bochs, cpu model corei7_haswell_4770 (VMX/EPT backend, unrestricted guest)"
bochs_run bochs-linux-vmx corei7_haswell_4770 "$(realpath "$lx/hv-linux.iso")" 512 600 \
    "backend: vmx .*scenario: linux" "vmx: pass-through vCPU" \
    "GUEST-INIT: linux .* reached /init: MemTotal: [0-9]+ kB; vendor_id: GenuineIntel" \
    "linux: guest exit: /init wrote 0x10 to the debug-exit port" \
    "linux: NPFs [0-9]+ resolved \\([1-9][0-9]* with a 2 MiB leaf, [0-9]+ with 4 KiB\\), 0 refused" \
    "HV-VERDICT: PASS linux: the kernel booted to /init"
grep -E "^linux: (NPFs|installed|guest exit)" "$out/bochs-linux-vmx-serial.txt" | sed 's/^/hv-test: bochs-linux-vmx: /' || true

echo "hv-test: total $(( $(date +%s) - t0 )) s"
if [ $fail != 0 ]; then
    echo "hv-test: FAILED" >&2
    exit 1
fi
echo "hv-test: all emulator runs passed"
