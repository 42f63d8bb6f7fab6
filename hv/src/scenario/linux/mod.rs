//! scenario::linux — an unmodified Linux kernel as a pass-through guest of hv (SVM + NPT, or
//! VMX + EPT with unrestricted guest),
//! selected when GRUB hands hv a bzImage as a boot module (`module2 /boot/vmlinuz <cmdline>`,
//! then `module2 /boot/initrd.img`).
//!
//! The guest gets the machine: its own devices (ports, MMIO, firmware tables) and interrupts
//! pass through (`Backend::new_passthrough_vcpu` says what is intercepted and why); its RAM is a
//! `Vmar` whose mappings are contiguous Vmos over the real frames at the same addresses, every
//! page installed lazily through `Vmar::handle_fault` (2 MiB leaves where the frames allow);
//! hv's own memory (its window, `layout.rs`) is outside every mapping, so a guest touch of it
//! is a refused fault that stops the guest with a report.
//!
//! One job per file:
//! - `mod.rs` — `plan` (is there a Linux guest, and hv's window), `run` (build, boot, serve
//!   exits, report and decide the verdict).
//! - `layout` — the guest-physical map: hv's window, guest RAM, pass-through, the E820 map.
//! - `ram` — guest RAM as Vmos over the machine's own frames.
//! - `bzimage` — the boot protocol: checks, the protected-mode kernel, the zero page.
//! - `acpi` — the RSDP and the FADT's power-off port.
//!
//! Invariants: nothing here panics on guest behaviour or on a bad image (a refused image is a
//! failing verdict with the reason); the verdict is PASS only for the outcome the command line
//! asks for — the guest's /init reaching the exit port (default), or, with `hvtest=touch-hv`,
//! the guest stopped by a refused fault inside hv's window.

pub mod acpi;
pub mod bzimage;
pub mod layout;
pub mod ram;

use alloc::format;
use alloc::string::String;

use ept::{MemType, PageSize, S2Perms, Stage2, PAGE_SIZE};
use vmo::Vmar;

use crate::platform::boot::{BootModule, MemoryMap};
use crate::platform::cpu::{inb, inl, inw, outb, outl, outw};
use crate::platform::serial::println;
use crate::platform::tsc;
use crate::virt::stage2::HvTable;
use crate::virt::vcpu::{Backend, BootEntry32, Exit, Vcpu};
use layout::Layout;
use ram::GuestMemory;

/// QEMU's isa-debug-exit port: the guest's /init writes its status here when it is done.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
/// The value /init writes on success (QEMU without hv would exit with 2 * 0x10 + 1 = 33).
pub const INIT_DONE: u32 = 0x10;
/// Where the zero page and the command line go (guest RAM below 1 MiB).
const ZERO_PAGE: u64 = 0x1_0000;
const CMDLINE: u64 = 0x1_1000;
/// The kernel's lowest load address on x86-64 (LOAD_PHYSICAL_ADDR of a default build).
const KERNEL_MIN: u64 = 16 << 20;
/// The command-line word that asks for the refused-access test.
const TOUCH_HV: &str = "hvtest=touch-hv";
const FOUR_GIB: u64 = 1 << 32;
const LARGE: u64 = PageSize::Size2M.bytes();

/// What GRUB handed hv for a Linux guest, and hv's window.
pub struct Plan {
    kernel: BootModule,
    initrd: BootModule,
    /// End of hv's window (`layout::window_end`).
    pub window_end: u64,
    /// hv's heap in the window: the guest RAM's page records grow with the RAM.
    pub heap_size: u64,
}

/// Heap for the Linux guest: a base for hv itself plus room for the memory model's records
/// of every guest RAM page (about 50 bytes each today; 64 leaves a margin).
const HEAP_BASE: u64 = 8 << 20;
const HEAP_PER_PAGE: u64 = 64;
/// Frames hv keeps in its window beyond the heap (second-level tables, VMCB/VMCS, maps).
const WINDOW_FRAMES: u64 = 8 << 20;

/// `None` when no boot module is a bzImage (the ordinary scenario runs); otherwise the plan,
/// or why the modules cannot be booted.
pub fn plan(map: &MemoryMap) -> Option<Result<Plan, String>> {
    let is_bzimage = |m: &BootModule| {
        // SAFETY: `plan` runs before `frames::init`, so nothing has reused module memory.
        let b = unsafe { m.bytes() };
        b.len() > 0x206 && &b[0x202..0x206] == b"HdrS"
    };
    let kernel = *map.modules().find(|m| is_bzimage(m))?;
    let Some(initrd) = map.modules().find(|m| m.start != kernel.start).copied() else {
        return Some(Err(String::from(
            "a bzImage module but no initramfs module",
        )));
    };
    if map
        .modules()
        .any(|m| m.start < layout::WINDOW_START || m.end > FOUR_GIB)
    {
        return Some(Err(String::from(
            "a boot module lies below 1 MiB or above 4 GiB (hv keeps modules in its window)",
        )));
    }
    let modules_end = map.modules().map(|m| m.end).max().unwrap_or(0);
    let ram_pages: u64 = map
        .areas()
        .iter()
        .map(|&(s, e)| e.min(FOUR_GIB).saturating_sub(s) / PAGE_SIZE)
        .sum();
    let heap_size = (HEAP_BASE + ram_pages * HEAP_PER_PAGE).next_multiple_of(1 << 20);
    let hv_end = crate::platform::frames::kernel_end().max(modules_end);
    Some(Ok(Plan {
        kernel,
        initrd,
        // frames::init carves the heap from a region at least twice its size.
        window_end: layout::window_end(hv_end + 2 * heap_size + WINDOW_FRAMES),
        heap_size,
    }))
}

/// How the guest's run ended.
enum End {
    /// /init wrote `value` to the debug-exit port.
    DebugExit(u32),
    /// The guest entered S5 through the FADT's PM1a control port.
    PowerOff,
    /// A second-level fault the Vmar refused.
    Refused {
        gpa: u64,
        error: vmo::Error,
        rip: u64,
    },
    /// Anything else that stopped it.
    Stopped(String),
}

/// Counters of one run.
#[derive(Default)]
struct RunStats {
    npf: u64,
    fault_ticks: u64,
    guest_ticks: u64,
    injected: u64,
    /// What the last injected exception answered.
    last_injected: Option<String>,
}

/// Installs every pass-through range as identity leaves (1 GiB, 2 MiB, 4 KiB: the largest the
/// alignment allows), all permissions, write-back (the guest's PAT decides the effective type).
fn install_passthrough(table: &mut HvTable, ranges: &[(u64, u64)]) -> Result<u64, ept::Error> {
    let mut leaves = 0;
    for &(start, end) in ranges {
        let mut gpa = start;
        while gpa < end {
            let size = [PageSize::Size1G, PageSize::Size2M, PageSize::Size4K]
                .into_iter()
                .find(|s| gpa.is_multiple_of(s.bytes()) && gpa + s.bytes() <= end)
                .unwrap_or(PageSize::Size4K);
            table.map(gpa, gpa, size, S2Perms::RWX, MemType::WriteBack)?;
            gpa += size.bytes();
            leaves += 1;
        }
    }
    Ok(leaves)
}

/// Boots the planned Linux guest on `backend` and serves it until it ends; the verdict detail.
pub fn run(backend: &mut dyn Backend, map: &MemoryMap, plan: &Plan) -> Result<String, String> {
    let tsc_per_ms = tsc::calibrate().unwrap_or(0);
    let setup_start = tsc::rdtsc();
    // SAFETY: the frame allocator excludes every module (frames::init), nothing else writes
    // them, and the guest cannot reach them (hv's window is outside every mapping).
    let (kernel_file, initrd) = unsafe { (plan.kernel.bytes(), plan.initrd.bytes()) };
    let image = bzimage::parse(kernel_file).map_err(|e| format!("kernel module: {e}"))?;
    let cmdline = plan.kernel.cmdline();
    if cmdline.len() > image.cmdline_max {
        return Err(format!(
            "command line longer than the kernel's {} bytes",
            image.cmdline_max
        ));
    }
    let expect_refusal = cmdline.split_ascii_whitespace().any(|w| w == TOUCH_HV);
    println!(
        "linux: bzImage {} KiB (boot protocol {}.{:02}, init_size {} MiB), initramfs {} KiB, command line \"{}\"",
        kernel_file.len() >> 10,
        image.protocol >> 8,
        image.protocol & 0xFF,
        image.init_size >> 20,
        initrd.len() >> 10,
        cmdline
    );

    let acpi = acpi::probe();
    let layout = layout::build(map.all_areas(), plan.window_end).map_err(String::from)?;
    let mut table = backend.new_stage2().map_err(|e| format!("stage2: {e}"))?;
    let pass_leaves = install_passthrough(&mut table, &layout.passthrough)
        .map_err(|e| format!("pass-through leaves: {e}"))?;
    let context = table.context();
    let vmar = Vmar::new_root(FOUR_GIB, table).map_err(|e| format!("vmar: {e}"))?;
    let mem = GuestMemory::new(&layout.ram, &vmar).map_err(|e| format!("guest RAM: {e}"))?;
    println!(
        "linux: guest RAM {} MiB in {} ranges (Vmar mappings of contiguous Vmos at their own addresses, installed on fault); hv window [{:#x}, {:#x}) reserved in the guest's E820 and in no mapping; {} pass-through ranges in {} leaves (firmware, ACPI, MMIO); PM1a control port {}",
        layout.ram_bytes() >> 20,
        layout.ram.len(),
        layout.window.0,
        layout.window.1,
        layout.passthrough.len(),
        pass_leaves,
        match acpi.as_ref().and_then(|a| a.pm1a_cnt) {
            Some(p) => format!("{p:#x}"),
            None => String::from("none"),
        }
    );

    let (entry, initrd_at) = load(&image, initrd, cmdline, &layout, &mem, acpi.as_ref())?;
    println!(
        "linux: kernel at {:#x} (32-bit boot protocol entry), zero page {:#x}, initramfs at {:#x}; setup took {} ms (TSC {} MHz); entering the guest",
        entry.eip,
        entry.esi,
        initrd_at,
        (tsc::rdtsc() - setup_start).checked_div(tsc_per_ms).unwrap_or(0),
        tsc_per_ms / 1000
    );
    let mut ports = alloc::vec![DEBUG_EXIT_PORT];
    if let Some(p) = acpi.as_ref().and_then(|a| a.pm1a_cnt) {
        ports.push(p);
    }
    let mut vcpu = backend.new_passthrough_vcpu(&entry, context, &ports)?;
    let mut stats = RunStats::default();
    let start = tsc::rdtsc();
    let end = serve(
        &mut *vcpu,
        &vmar,
        acpi.as_ref().and_then(|a| a.pm1a_cnt),
        &mut stats,
    );
    stats.guest_ticks = tsc::rdtsc() - start;
    report(&vmar, &layout, &stats, tsc_per_ms, &end);
    drop(vcpu);

    let verdict = match (&end, expect_refusal) {
        (End::DebugExit(INIT_DONE), false) | (End::PowerOff, false) => Ok(format!(
            "linux: the kernel booted to /init and exited ({} MiB RAM, {} NPFs)",
            layout.ram_bytes() >> 20,
            stats.npf
        )),
        (End::Refused { gpa, .. }, true) if layout.in_window(*gpa) => Ok(format!(
            "linux-refused: the guest's access to hv's memory at GPA {gpa:#x} was refused and the guest stopped"
        )),
        (End::Refused { gpa, error, rip }, _) => Err(format!(
            "linux: guest stopped by a refused fault at GPA {gpa:#x} ({error:?}, RIP {rip:#x})"
        )),
        (End::DebugExit(v), false) => Err(format!("linux: /init reported failure {v:#x}")),
        (End::DebugExit(_) | End::PowerOff, true) => Err(String::from(
            "linux: the guest's access to hv's memory was not refused",
        )),
        (End::Stopped(why), _) => Err(format!("linux: guest stopped: {why}")),
    };
    drop(mem);
    drop(vmar);
    verdict
}

/// Places kernel, initramfs, command line and zero page in guest RAM; the entry state.
fn load(
    image: &bzimage::BzImage<'_>,
    initrd: &[u8],
    cmdline: &str,
    layout: &Layout,
    mem: &GuestMemory,
    acpi: Option<&acpi::Acpi>,
) -> Result<(BootEntry32, u64), String> {
    let err = |what: &str, e: vmo::Error| format!("loading the {what}: {e}");
    // The kernel: the lowest aligned address ≥ 16 MiB with init_size bytes of RAM after it.
    let kernel_at = layout
        .ram
        .iter()
        .map(|&(s, e)| (s.max(KERNEL_MIN).next_multiple_of(image.alignment), e))
        .find(|&(at, e)| at + image.init_size <= e && at + image.init_size < FOUR_GIB)
        .map(|(at, _)| at)
        .ok_or("no RAM range holds the kernel's init_size")?;
    let kernel_end = kernel_at + image.init_size;
    // The initramfs: as high as the kernel allows, above the kernel's area.
    let len = initrd.len() as u64;
    let initrd_at = layout
        .ram
        .iter()
        .rev()
        .filter_map(|&(s, e)| {
            let top = e.min(image.initrd_max.saturating_add(1));
            let at = top.checked_sub(len)? & !(PAGE_SIZE - 1);
            (at >= s.max(kernel_end)).then_some(at)
        })
        .next()
        .ok_or("no RAM above the kernel holds the initramfs")?;
    mem.write(kernel_at, image.protected_mode())
        .map_err(|e| err("kernel", e))?;
    mem.write(initrd_at, initrd)
        .map_err(|e| err("initramfs", e))?;
    let mut line = alloc::vec::Vec::from(cmdline.as_bytes());
    line.push(0);
    mem.write(CMDLINE, &line)
        .map_err(|e| err("command line", e))?;
    let zp = image
        .zero_page(&bzimage::BootParams {
            kernel_at: kernel_at as u32,
            cmdline_at: CMDLINE as u32,
            initrd_at: initrd_at as u32,
            initrd_len: len as u32,
            rsdp: acpi.map_or(0, |a| a.rsdp),
            e820: &layout.e820,
        })
        .map_err(String::from)?;
    mem.write(ZERO_PAGE, &zp).map_err(|e| err("zero page", e))?;
    Ok((
        BootEntry32 {
            eip: kernel_at as u32,
            esi: ZERO_PAGE as u32,
        },
        initrd_at,
    ))
}

/// Runs the guest until it ends, serving its exits.
fn serve(
    vcpu: &mut dyn Vcpu,
    vmar: &Vmar<HvTable>,
    pm1a_cnt: Option<u16>,
    stats: &mut RunStats,
) -> End {
    loop {
        match vcpu.run() {
            Exit::Stage2Fault(f) => {
                let t0 = tsc::rdtsc();
                let r = vmar.handle_fault(f);
                let v = vmar.with_stage2(|t| t.take_tlb_control());
                stats.fault_ticks += tsc::rdtsc() - t0;
                match r {
                    Ok(_) => {
                        stats.npf += 1;
                        if v != 0 {
                            vcpu.tlb_control(v);
                        }
                    }
                    Err(error) => {
                        return End::Refused {
                            gpa: f.gpa,
                            error,
                            rip: vcpu.rip(),
                        }
                    }
                }
            }
            Exit::Io {
                port,
                size,
                write,
                value,
            } => {
                if write && port == DEBUG_EXIT_PORT {
                    return End::DebugExit(value & 0xFF);
                }
                if write && Some(port) == pm1a_cnt && value & acpi::PM1_SLP_EN != 0 {
                    return End::PowerOff;
                }
                // Any other access to a trapped port goes to the device, as if not trapped.
                let g = vcpu.gprs();
                match (write, size) {
                    (true, 1) => outb(port, value as u8),
                    (true, 2) => outw(port, value as u16),
                    (true, _) => outl(port, value),
                    (false, 1) => g.rax = (g.rax & !0xFF) | u64::from(inb(port)),
                    (false, 2) => g.rax = (g.rax & !0xFFFF) | u64::from(inw(port)),
                    (false, _) => g.rax = u64::from(inl(port)),
                }
            }
            Exit::Msr { msr, write } => {
                // A trapped MSR (one that would reach hv): refused as the architecture refuses
                // a bad MSR access.
                stats.injected += 1;
                stats.last_injected = Some(format!(
                    "#GP for {} of MSR {msr:#x}",
                    if write { "WRMSR" } else { "RDMSR" }
                ));
                vcpu.inject_exception(13, Some(0));
            }
            Exit::VirtInstruction => {
                // hv offers no nested virtualization: #UD, as on a CPU without VMX / SVM.
                stats.injected += 1;
                stats.last_injected = Some(format!(
                    "#UD for a virtualization instruction at RIP {:#x}",
                    vcpu.rip()
                ));
                vcpu.inject_exception(6, None);
            }
            Exit::Shutdown => {
                return End::Stopped(format!("triple fault at RIP {:#x}", vcpu.rip()))
            }
            Exit::Misconfig { gpa, what } => {
                return End::Stopped(format!("second-level entry malformed: {what} at {gpa:#x}"))
            }
            Exit::Hypercall | Exit::Hlt | Exit::Exception { .. } => {
                // Not intercepted on a pass-through vCPU (a VMCALL arrives as VirtInstruction).
                return End::Stopped(format!(
                    "an exit that is not intercepted at RIP {:#x}",
                    vcpu.rip()
                ));
            }
            Exit::Unexpected { code, detail } => {
                return End::Stopped(format!(
                    "unexpected exit {code:#x} (detail {detail:#x}) at RIP {:#x}",
                    vcpu.rip()
                ))
            }
        }
    }
}

/// Prints how the run ended and what the fault path did: NPFs, time in the fault path, leaves
/// and the share of guest RAM installed.
fn report(vmar: &Vmar<HvTable>, layout: &Layout, stats: &RunStats, tsc_per_ms: u64, end: &End) {
    let us = |ticks: u64| (ticks * 1000).checked_div(tsc_per_ms).unwrap_or(0);
    match end {
        End::DebugExit(v) => println!(
            "linux: guest exit: /init wrote {v:#x} to the debug-exit port after {} ms in the guest",
            us(stats.guest_ticks) / 1000
        ),
        End::PowerOff => println!(
            "linux: guest exit: powered off (ACPI S5) after {} ms in the guest",
            us(stats.guest_ticks) / 1000
        ),
        End::Refused { gpa, error, rip } => println!(
            "linux: guest stopped: second-level fault refused at GPA {gpa:#x} ({error:?}; {}), RIP {rip:#x}",
            if layout.in_window(*gpa) { "inside hv's window" } else { "outside every mapping" }
        ),
        End::Stopped(why) => println!("linux: guest stopped: {why}"),
    }
    let f = vmar.fault_stats();
    let (mut large, mut small) = (0u64, 0u64);
    vmar.with_stage2(|t| {
        for &(start, end) in &layout.ram {
            let mut gpa = start;
            while gpa < end {
                match t.query(gpa) {
                    Some(tr) if tr.size == PageSize::Size2M && tr.gpa == gpa => {
                        large += 1;
                        gpa += LARGE;
                    }
                    Some(_) => {
                        small += 1;
                        gpa += PAGE_SIZE;
                    }
                    None => gpa += PAGE_SIZE,
                }
            }
        }
    });
    let installed = large * (LARGE / PAGE_SIZE) + small;
    let ram_pages = layout.ram_bytes() / PAGE_SIZE;
    println!(
        "linux: NPFs {} resolved ({} with a 2 MiB leaf, {} with 4 KiB), {} refused; fault path {} us in all ({} us per NPF, {}.{:02}% of the guest's time); {} exceptions injected{}",
        stats.npf,
        f.large_leaves,
        stats.npf - f.large_leaves,
        f.refused,
        us(stats.fault_ticks),
        us(stats.fault_ticks) / stats.npf.max(1),
        stats.fault_ticks * 100 / stats.guest_ticks.max(1),
        stats.fault_ticks * 10_000 / stats.guest_ticks.max(1) % 100,
        stats.injected,
        match &stats.last_injected {
            Some(what) => format!(" (last: {what})"),
            None => String::new(),
        }
    );
    println!(
        "linux: installed {} of {} guest RAM pages ({}%): {} 2 MiB leaves, {} 4 KiB leaves",
        installed,
        ram_pages,
        installed * 100 / ram_pages.max(1),
        large,
        small
    );
}
