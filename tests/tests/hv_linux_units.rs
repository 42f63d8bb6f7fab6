//! Host tests of the pure parts of hv's Linux guest (`hv/src/scenario/linux/`), compiled here
//! from hv's own source files (hv is a freestanding kernel crate without a test harness): the
//! boot-protocol reader `bzimage.rs` refuses every malformed image with a reason and never
//! panics, and builds the zero page's fields where the protocol puts them; the layout
//! `layout.rs` cuts `[0, 4 GiB)` into hv's window, guest RAM and pass-through exactly, with an
//! E820 map that calls only guest RAM usable.

extern crate alloc;

/// What `layout.rs` imports from hv's platform floor.
mod platform {
    pub mod boot {
        pub const E820_RAM: u32 = 1;
    }
}

// hv uses every item; this test does not (e.g. `initrd_max`).
#[allow(dead_code)]
#[path = "../../hv/src/scenario/linux/bzimage.rs"]
mod bzimage;
#[allow(dead_code)]
#[path = "../../hv/src/scenario/linux/layout.rs"]
mod layout;

use proptest::prelude::*;

const K4: u64 = 4096;
const M1: u64 = 1 << 20;
const G4: u64 = 1 << 32;

/// A minimal bzImage: 4 setup sectors + 1 boot sector, header fields of protocol 2.15, and
/// `payload` bytes of protected-mode kernel.
fn image(payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 5 * 512 + payload];
    f[0x1F1] = 4;
    f[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
    f[0x200] = 0xEB;
    f[0x201] = 0x6A; // header ends at 0x26C
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
    f[0x211] = 1; // LOADED_HIGH
    f[0x22C..0x230].copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
    f[0x230..0x234].copy_from_slice(&(2 * M1 as u32).to_le_bytes());
    f[0x234] = 1; // relocatable
    f[0x238..0x23C].copy_from_slice(&2047u32.to_le_bytes());
    f[0x260..0x264].copy_from_slice(&(64 * M1 as u32).to_le_bytes());
    for (i, b) in f[5 * 512..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

#[test]
fn a_valid_image_parses_and_its_zero_page_holds_what_the_loader_placed() {
    let f = image(1000);
    let img = bzimage::parse(&f).unwrap();
    assert_eq!(img.protocol, 0x020F);
    assert_eq!(img.init_size, 64 * M1);
    assert_eq!(img.alignment, 2 * M1);
    assert_eq!(img.cmdline_max, 2047);
    assert_eq!(img.protected_mode(), &f[5 * 512..]);
    let e820 = [(0, K4, 2), (K4, 0x9F000, 1), (64 * M1, 512 * M1, 1)];
    let zp = img
        .zero_page(&bzimage::BootParams {
            kernel_at: 64 * M1 as u32,
            cmdline_at: 0x11000,
            initrd_at: 0x1F00_0000,
            initrd_len: 12345,
            rsdp: 0xF5BA0,
            e820: &e820,
        })
        .unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(zp[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(zp[o..o + 8].try_into().unwrap());
    assert_eq!(
        &zp[0x202..0x206],
        b"HdrS",
        "the image's own setup header is copied"
    );
    assert_eq!(zp[0x210], 0xFF, "type_of_loader: undefined");
    assert_eq!(u32_at(0x214), 64 * M1 as u32, "code32_start");
    assert_eq!(u32_at(0x218), 0x1F00_0000, "ramdisk_image");
    assert_eq!(u32_at(0x21C), 12345, "ramdisk_size");
    assert_eq!(u32_at(0x228), 0x11000, "cmd_line_ptr");
    assert_eq!(u64_at(0x070), 0xF5BA0, "acpi_rsdp_addr");
    assert_eq!(zp[0x1E8], 3, "e820_entries");
    for (i, &(s, e, t)) in e820.iter().enumerate() {
        let o = 0x2D0 + i * 20;
        assert_eq!((u64_at(o), u64_at(o + 8), u32_at(o + 16)), (s, e - s, t));
    }
    let too_many = vec![(0, K4, 1); 129];
    assert!(img
        .zero_page(&bzimage::BootParams {
            kernel_at: 0,
            cmdline_at: 0,
            initrd_at: 0,
            initrd_len: 0,
            rsdp: 0,
            e820: &too_many,
        })
        .is_err());
}

#[test]
fn every_malformed_image_is_refused_with_a_reason() {
    let good = image(100);
    type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Corrupt)> = vec![
        ("no magic", Box::new(|f| f[0x202] = b'X')),
        ("no boot flag", Box::new(|f| f[0x1FE] = 0)),
        ("protocol 2.11", Box::new(|f| f[0x206] = 0x0B)),
        ("not loaded high", Box::new(|f| f[0x211] = 0)),
        ("not relocatable", Box::new(|f| f[0x234] = 0)),
        ("alignment not a power of two", Box::new(|f| f[0x230] = 3)),
        ("header past the page", Box::new(|f| f[0x201] = 0x00)),
        ("setup sectors past the file", Box::new(|f| f[0x1F1] = 200)),
        ("truncated", Box::new(|f| f.truncate(0x200))),
    ];
    for (what, corrupt) in cases {
        let mut f = good.clone();
        corrupt(&mut f);
        let err = bzimage::parse(&f).err();
        assert!(err.is_some(), "{what}: accepted");
        assert!(!err.unwrap().is_empty());
    }
}

proptest! {
    #[test]
    fn the_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096),
                               cut in 0usize..3200, flip in 0usize..3200, v in any::<u8>()) {
        let _ = bzimage::parse(&bytes);
        let mut f = image(300);
        if flip < f.len() { f[flip] = v; }
        f.truncate(cut.min(f.len()));
        if let Ok(img) = bzimage::parse(&f) {
            let _ = img.protected_mode();
            let _ = img.zero_page(&bzimage::BootParams {
                kernel_at: 0, cmdline_at: 0, initrd_at: 0, initrd_len: 0, rsdp: 0, e820: &[],
            });
        }
    }
}

/// QEMU's (SeaBIOS) map for `-m 512`: RAM, EBDA, BIOS, RAM, ACPI at the top, the BIOS flash,
/// and the reserved HyperTransport hole above 1 TiB that AMD models report.
fn qemu_512() -> Vec<(u64, u64, u32)> {
    vec![
        (0, 0x9FC00, 1),
        (0x9FC00, 0xA0000, 2),
        (0xF0000, 0x10_0000, 2),
        (0x10_0000, 0x1FFE_0000, 1),
        (0x1FFE_0000, 0x2000_0000, 2),
        (0xFFFC_0000, G4, 2),
        (0xFD_0000_0000, 0x100_0000_0000, 2),
    ]
}

/// The layout invariants of `layout.rs`'s doc, checked on `l`.
fn check(l: &layout::Layout) {
    let mut all: Vec<(u64, u64)> = l
        .ram
        .iter()
        .chain(l.passthrough.iter())
        .copied()
        .chain(std::iter::once(l.window))
        .collect();
    all.sort_unstable();
    assert_eq!(all.first().map(|r| r.0), Some(0));
    assert_eq!(all.last().map(|r| r.1), Some(G4));
    for w in all.windows(2) {
        assert_eq!(
            w[0].1, w[1].0,
            "the three kinds tile [0, 4 GiB) without gap or overlap"
        );
    }
    for &(s, e) in &all {
        assert!(
            s < e && s % K4 == 0 && e % K4 == 0,
            "{s:#x}..{e:#x} page aligned, non-empty"
        );
    }
    let usable: Vec<(u64, u64)> = l
        .e820
        .iter()
        .filter(|a| a.2 == 1)
        .map(|a| (a.0, a.1))
        .collect();
    assert_eq!(usable, l.ram, "the E820 map calls exactly guest RAM usable");
    assert!(l.e820.windows(2).all(|w| w[0].0 <= w[1].0), "sorted");
    assert!(l
        .e820
        .iter()
        .any(|a| a.0 == l.window.0 && a.1 == l.window.1 && a.2 == 2));
    assert!(
        !l.ram.iter().any(|&(s, _)| s == 0),
        "page 0 is not guest RAM"
    );
}

#[test]
fn the_qemu_map_splits_into_window_ram_and_pass_through() {
    let l = layout::build(&qemu_512(), 64 * M1).unwrap();
    assert_eq!(l.window, (M1, 64 * M1));
    assert_eq!(l.ram, vec![(K4, 0x9F000), (64 * M1, 0x1FFE_0000)]);
    assert_eq!(l.ram_bytes(), 0x9E000 + 0x1FFE_0000 - 64 * M1);
    assert!(l.in_window(M1) && l.in_window(64 * M1 - 1) && !l.in_window(64 * M1));
    assert!(
        l.passthrough.contains(&(0, K4)),
        "page 0 (BIOS data) passes through"
    );
    assert!(
        l.passthrough.contains(&(0x1FFE_0000, G4)),
        "ACPI, the PCI hole, the flash"
    );
    check(&l);
    assert_eq!(layout::window_end(10 * M1), 64 * M1);
    assert_eq!(layout::window_end(75 * M1 + 1), 76 * M1);
}

#[test]
fn unusable_maps_are_errors() {
    assert!(
        layout::build(&[(0, M1, 1), (M1 / 2, 2 * M1, 1)], 64 * M1).is_err(),
        "overlap"
    );
    assert!(
        layout::build(&[(0, 32 * M1, 1)], 64 * M1).is_ok(),
        "low RAM alone is RAM"
    );
    assert!(
        layout::build(&[(M1, 32 * M1, 1)], 64 * M1).is_err(),
        "no RAM outside the window"
    );
}

proptest! {
    #[test]
    fn any_map_tiles_the_first_4_gib(areas in proptest::collection::vec(
        (0u64..(1 << 21), 1u64..(1 << 18), 1u32..6), 1..12)) {
        // Non-overlapping areas in 4 KiB units, sorted, some above 4 GiB.
        let mut at = 0u64;
        let mut map = Vec::new();
        for (gap, len, typ) in areas {
            let s = at + gap * 1024;
            let e = s + len * 1024;
            map.push((s, e, typ));
            at = e;
        }
        if let Ok(l) = layout::build(&map, 64 * M1) {
            check(&l);
        }
    }
}
