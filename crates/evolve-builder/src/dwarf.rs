//! What the rebuilt objects' DWARF says about their functions: the functions each one inlines
//! and where (to name why a function changed: "inlines `shapes::scale`"), the source files its
//! code comes from (to tell an edit from a build that does not reproduce), and whether it is
//! the body of an `async fn` (rustc names that body `{async_fn#0}`).
//!
//! Even `debug = "line-tables-only"` keeps all three: inlined-subroutine entries with their
//! ranges and the names of their origins, and the line table. The objects are not linked, so
//! their DWARF holds relocations; they are applied first, giving every code section its own
//! 4 GiB window of addresses (`section index << 32`), so that an address names its function's
//! section and the offset in it.

use crate::objfile::ObjectFile;
use gimli::{AttributeValue, EndianSlice, LittleEndian, SectionId};
use object::elf;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

/// A function inlined into another, at some of its offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inlined {
    /// Offsets `[start, end)` in the caller's section.
    pub start: u64,
    /// End.
    pub end: u64,
    /// Nesting (1: inlined directly into the function).
    pub depth: usize,
    /// Its DWARF name (with `debug = "line-tables-only"` a short one: `scale`, `{closure#0}`).
    pub path: String,
    /// The DWARF name of what it is inlined into (an enclosing inlined function, or the
    /// function): a closure's is `…<shapes::f::{closure_env#0}, …>`, which names the closure.
    pub parent: String,
}

/// What DWARF says about one function (by its section).
#[derive(Debug, Clone, Default)]
pub struct FunctionDebug {
    /// The function's own DWARF name path (`shapes::fetch::{async_fn#0}`).
    pub path: String,
    /// The functions inlined into it.
    pub inlined: Vec<Inlined>,
    /// Source files its code comes from (line table).
    pub files: BTreeSet<PathBuf>,
    /// Line-table rows: (offset, index in `sources`, line), by offset.
    pub rows: Vec<(u64, usize, u64)>,
    /// The files rows refer to.
    pub sources: Vec<PathBuf>,
}

impl FunctionDebug {
    /// The innermost inlined function covering `offset`, if any.
    pub fn inlined_at(&self, offset: u64) -> Option<&Inlined> {
        self.inlined
            .iter()
            .filter(|i| i.start <= offset && offset < i.end)
            .max_by_key(|i| i.depth)
    }

    /// The source file of the code at `offset`.
    pub fn file_at(&self, offset: u64) -> Option<&PathBuf> {
        let (file, _) = self.line_at(offset)?;
        self.sources.get(file)
    }

    /// The (file index, line) of the code at `offset`.
    fn line_at(&self, offset: u64) -> Option<(usize, u64)> {
        let at = self.rows.partition_point(|(o, _, _)| *o <= offset);
        let (_, file, line) = self.rows.get(at.checked_sub(1)?)?;
        Some((*file, *line))
    }

    /// The inlined function whose code is at `offset`: the innermost one whose range covers it,
    /// or — the optimiser merges and moves inlined instructions, keeping their line — the
    /// innermost one whose code elsewhere comes from the same source line.
    pub fn inlined_owning(&self, offset: u64) -> Option<&Inlined> {
        if let Some(inlined) = self.inlined_at(offset) {
            return Some(inlined);
        }
        let line = self.line_at(offset)?;
        self.inlined
            .iter()
            .filter(|i| {
                let from = self.rows.partition_point(|(o, _, _)| *o < i.start);
                self.rows[from..]
                    .iter()
                    .take_while(|(o, _, _)| *o < i.end)
                    .any(|(_, f, l)| (*f, *l) == line)
            })
            .max_by_key(|i| i.depth)
    }

    /// Whether it is, or inlines, the body of an `async fn` or `async` block: the state
    /// machine whose layout in-flight futures depend on. Returns its path.
    pub fn async_body(&self) -> Option<&str> {
        let is_async = |p: &str| p.contains("{async_fn#") || p.contains("{async_block#");
        if is_async(&self.path) {
            return Some(&self.path);
        }
        self.inlined
            .iter()
            .find(|i| is_async(&i.path))
            .map(|i| i.path.as_str())
    }
}

/// The DWARF of one object: its functions' debug information, by section index.
pub fn read(object: &ObjectFile) -> HashMap<usize, FunctionDebug> {
    let sections = relocated_sections(object);
    let empty: &[u8] = &[];
    let load = |id: SectionId| -> Result<EndianSlice<'_, LittleEndian>, gimli::Error> {
        let data = sections.get(id.name()).map_or(empty, Vec::as_slice);
        Ok(EndianSlice::new(data, LittleEndian))
    };
    let Ok(dwarf) = gimli::Dwarf::load(load) else {
        return HashMap::new();
    };
    let mut out: HashMap<usize, FunctionDebug> = HashMap::new();
    let mut units = dwarf.units();
    while let Ok(Some(header)) = units.next() {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let _ = read_unit(&dwarf, &unit, &mut out);
        read_lines(&dwarf, &unit, &mut out);
    }
    out
}

type Reader<'a> = EndianSlice<'a, LittleEndian>;

fn read_unit(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &gimli::Unit<Reader<'_>>,
    out: &mut HashMap<usize, FunctionDebug>,
) -> gimli::Result<()> {
    // Paths of every entry (namespaces and subprograms), for abstract origins.
    let mut paths: HashMap<usize, String> = HashMap::new();
    let mut stack: Vec<(isize, String)> = Vec::new();
    // The concrete function being walked: (its depth, its section), and the names of the
    // inlined functions enclosing the entry being read, by depth.
    let mut current: Option<(isize, usize)> = None;
    let mut enclosing: Vec<(isize, String)> = Vec::new();
    let mut entries = unit.entries();
    while let Some(entry) = entries.next_dfs()? {
        let depth = entry.depth();
        while stack.last().is_some_and(|(d, _)| *d >= depth) {
            stack.pop();
        }
        if current.is_some_and(|(d, _)| depth <= d) {
            current = None;
        }
        while enclosing.last().is_some_and(|(d, _)| *d >= depth) {
            enclosing.pop();
        }
        let name = entry
            .attr_value(gimli::DW_AT_name)
            .and_then(|v| dwarf.attr_string(unit, v).ok())
            .map(|s| s.to_string_lossy().into_owned());
        let parent = stack.last().map(|(_, p)| p.clone()).unwrap_or_default();
        let join = |name: &str| {
            if parent.is_empty() {
                name.to_string()
            } else {
                format!("{parent}::{name}")
            }
        };
        match entry.tag() {
            gimli::DW_TAG_namespace | gimli::DW_TAG_structure_type => {
                if let Some(name) = &name {
                    stack.push((depth, join(name)));
                }
            }
            gimli::DW_TAG_subprogram => {
                let path = name.as_deref().map(join).unwrap_or_default();
                paths.insert(entry.offset().0, path.clone());
                let mut ranges = dwarf.die_ranges(unit, entry)?;
                if let Some(range) = ranges.next()? {
                    let section = (range.begin >> 32) as usize;
                    if section != 0 {
                        current = Some((depth, section));
                        enclosing.clear();
                        enclosing.push((depth, path.clone()));
                        out.entry(section).or_default().path = path;
                    }
                }
            }
            gimli::DW_TAG_inlined_subroutine => {
                let Some((outer, section)) = current else {
                    continue;
                };
                let path = match entry.attr_value(gimli::DW_AT_abstract_origin) {
                    Some(AttributeValue::UnitRef(origin)) => {
                        paths.get(&origin.0).cloned().unwrap_or_default()
                    }
                    _ => String::new(),
                };
                let parent = enclosing.last().map(|(_, p)| p.clone()).unwrap_or_default();
                let mut ranges = dwarf.die_ranges(unit, entry)?;
                while let Some(range) = ranges.next()? {
                    if (range.begin >> 32) as usize != section {
                        continue;
                    }
                    out.entry(section).or_default().inlined.push(Inlined {
                        start: range.begin & 0xffff_ffff,
                        end: range.end & 0xffff_ffff,
                        depth: (depth - outer).max(1) as usize,
                        path: path.clone(),
                        parent: parent.clone(),
                    });
                }
                enclosing.push((depth, path));
            }
            _ => {}
        }
    }
    Ok(())
}

fn read_lines(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &gimli::Unit<Reader<'_>>,
    out: &mut HashMap<usize, FunctionDebug>,
) {
    let Some(program) = unit.line_program.clone() else {
        return;
    };
    let comp_dir = unit
        .comp_dir
        .map(|d| PathBuf::from(d.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let mut rows = program.rows();
    while let Ok(Some((header, row))) = rows.next_row() {
        let section = (row.address() >> 32) as usize;
        if section == 0 || row.end_sequence() {
            continue;
        }
        let Some(file) = row.file(header) else {
            continue;
        };
        let mut path = comp_dir.clone();
        if let Some(dir) = file.directory(header) {
            if let Ok(dir) = dwarf.attr_string(unit, dir) {
                path.push(dir.to_string_lossy().as_ref());
            }
        }
        if let Ok(name) = dwarf.attr_string(unit, file.path_name()) {
            path.push(name.to_string_lossy().as_ref());
        }
        let function = out.entry(section).or_default();
        let index = match function.sources.iter().position(|s| *s == path) {
            Some(i) => i,
            None => {
                function.sources.push(path.clone());
                function.sources.len() - 1
            }
        };
        let line = row.line().map_or(0, |l| l.get());
        function
            .rows
            .push((row.address() & 0xffff_ffff, index, line));
        function.files.insert(path);
    }
    for function in out.values_mut() {
        function.rows.sort();
    }
}

/// The object's `.debug_*` sections with their relocations applied: a code section's address
/// is `index << 32`, a debug section's is 0 (references into it are offsets).
fn relocated_sections(object: &ObjectFile) -> HashMap<&'static str, Vec<u8>> {
    let mut out = HashMap::new();
    for id in [
        SectionId::DebugAbbrev,
        SectionId::DebugAddr,
        SectionId::DebugInfo,
        SectionId::DebugLine,
        SectionId::DebugLineStr,
        SectionId::DebugRanges,
        SectionId::DebugRngLists,
        SectionId::DebugStr,
        SectionId::DebugStrOffsets,
    ] {
        let Some(section) = object.section_named(id.name()) else {
            continue;
        };
        let mut data = section.data.clone();
        for reloc in &section.relocations {
            let symbol = &object.symbols[reloc.symbol];
            let base = match symbol.section {
                Some(s) if object.sections[s].is_text() => ((s as u64) << 32) + symbol.value,
                Some(_) => symbol.value,
                None => 0,
            };
            let value = base.wrapping_add_signed(reloc.addend);
            let at = reloc.offset as usize;
            match reloc.r_type {
                elf::R_X86_64_64 => {
                    if let Some(slot) = data.get_mut(at..at + 8) {
                        slot.copy_from_slice(&value.to_le_bytes());
                    }
                }
                elf::R_X86_64_32 => {
                    if let Some(slot) = data.get_mut(at..at + 4) {
                        slot.copy_from_slice(&(value as u32).to_le_bytes());
                    }
                }
                _ => {}
            }
        }
        out.insert(id.name(), data);
    }
    out
}
