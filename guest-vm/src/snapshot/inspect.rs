//! `inspect`: what a snapshot file or chain holds — header, sections, layer chain, page counts
//! and the recorded working set — as a serializable report (`--json`) and as text. Opens the files with the same checks as
//! a restore (`open_chain`), so inspecting a bad file reports the same typed error.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::error::SnapResult;
use super::file::SnapshotFile;
use super::format::Section;
use super::restore::open_chain;
use super::sections::MappingDesc;

/// One section, named.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SectionReport {
    pub name: &'static str,
    #[serde(flatten)]
    pub section: Section,
}

/// One file of the chain.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerReport {
    pub path: PathBuf,
    pub format: String,
    pub arch: u32,
    pub page_size: u32,
    pub features: u64,
    pub diff: bool,
    pub identity: String,
    pub base: Option<String>,
    pub mem_size: u64,
    pub sections: Vec<SectionReport>,
    pub data_pages: u64,
    pub zero_pages: u64,
    /// The recorded working set (format 1.1), if the file has one.
    pub working_set: Option<WorkingSetReport>,
    pub vmos: Vec<u64>,
    pub mappings: Vec<MappingReport>,
}

/// The working set a file carries.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkingSetReport {
    pub pages: u64,
    pub written: u64,
    pub runs: u64,
}

/// One mapping of the layout.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MappingReport {
    pub base: u64,
    pub len: u64,
    pub vmo: u32,
    pub vmo_offset: u64,
    pub perms: String,
    pub shared: bool,
}

impl From<&MappingDesc> for MappingReport {
    fn from(m: &MappingDesc) -> Self {
        let p = vmo::VmPerms::from_bits_truncate(m.perms);
        let bit = |f: vmo::VmPerms, c: char| if p.contains(f) { c } else { '-' };
        MappingReport {
            base: m.base,
            len: m.len,
            vmo: m.vmo,
            vmo_offset: m.vmo_offset,
            perms: [
                bit(vmo::VmPerms::READ, 'r'),
                bit(vmo::VmPerms::WRITE, 'w'),
                bit(vmo::VmPerms::EXEC, 'x'),
            ]
            .iter()
            .collect(),
            shared: m.shared,
        }
    }
}

/// The whole chain, base first.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InspectReport {
    pub layers: Vec<LayerReport>,
}

fn layer(f: &SnapshotFile) -> LayerReport {
    let h = &f.header;
    LayerReport {
        path: f.path().to_path_buf(),
        format: format!("{}.{}", h.major, h.minor),
        arch: h.arch,
        page_size: h.page_size,
        features: h.features,
        diff: h.is_diff(),
        identity: h.identity.to_string(),
        base: h.is_diff().then(|| h.base.to_string()),
        mem_size: h.mem_size,
        sections: h
            .present()
            .iter()
            .map(|k| SectionReport {
                name: k.name(),
                section: h.section(*k),
            })
            .collect(),
        data_pages: f.data_pages,
        zero_pages: f.zero_pages,
        working_set: f.working_set.as_ref().map(|w| WorkingSetReport {
            pages: w.len() as u64,
            written: w.written() as u64,
            runs: w.runs().len() as u64,
        }),
        vmos: f.layout.vmos.iter().map(|v| v.size).collect(),
        mappings: f.layout.mappings.iter().map(MappingReport::from).collect(),
    }
}

/// Opens and checks `paths` (base first) and describes them.
pub fn inspect(paths: &[PathBuf]) -> SnapResult<InspectReport> {
    // One file is described alone (a diff without its base too); a chain is checked as such.
    let layers = match paths {
        [one] => vec![SnapshotFile::open(one)?],
        _ => open_chain(paths)?,
    };
    Ok(InspectReport {
        layers: layers.iter().map(layer).collect(),
    })
}

/// The report as text.
pub fn render(r: &InspectReport) -> String {
    let mut s = String::new();
    for (i, l) in r.layers.iter().enumerate() {
        let kind = if l.diff { "diff" } else { "full" };
        let _ = writeln!(s, "layer {i}: {} ({kind})", l.path.display());
        let _ = writeln!(
            s,
            "  format {}, arch {}, page size {}, features {:#x}, guest {} MiB",
            l.format,
            l.arch,
            l.page_size,
            l.features,
            l.mem_size >> 20
        );
        let _ = writeln!(s, "  identity {}", l.identity);
        if let Some(b) = &l.base {
            let _ = writeln!(s, "  base     {b}");
        }
        for sec in &l.sections {
            let _ = writeln!(
                s,
                "  section {:<12} offset {:>10} length {:>10} crc32 {:#010x}",
                sec.name, sec.section.offset, sec.section.length, sec.section.crc32
            );
        }
        let _ = writeln!(
            s,
            "  pages: {} stored, {} zero entries; vmos {:?}",
            l.data_pages, l.zero_pages, l.vmos
        );
        if let Some(w) = &l.working_set {
            let _ = writeln!(
                s,
                "  working set: {} pages ({} written) in {} runs, prefetched by a restore",
                w.pages, w.written, w.runs
            );
        }
        for m in &l.mappings {
            let _ = writeln!(
                s,
                "  map {:#x}+{:#x} vmo {}@{:#x} {}{}",
                m.base,
                m.len,
                m.vmo,
                m.vmo_offset,
                m.perms,
                if m.shared { " shared" } else { "" }
            );
        }
    }
    s
}
