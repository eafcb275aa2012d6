//! An image's symbols at their runtime addresses, with lookups by name and by address.
//!
//! The table is built once per image: sorted by address for containment queries, plus two sorted
//! index vectors for exact name lookups (raw and demangled), which avoids duplicating every name
//! in a hash map.

use super::elf::RawSymbol;

/// What a [`Symbol`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SymbolKind {
    /// Code (`STT_FUNC`, or `STT_GNU_IFUNC`, whose address is its resolver's code).
    Function,
    /// Data (`STT_OBJECT`).
    Object,
}

/// A function or data object of an image, at its runtime address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// The name as stored in the symbol table (possibly mangled).
    pub name: String,
    /// The Rust-demangled name without hash (`rustc_demangle`'s `{:#}` form), or `name` itself
    /// for names that are not Rust-mangled.
    pub demangled: String,
    /// Runtime address of the first byte.
    pub address: usize,
    /// Size in bytes (0 if the symbol table does not say).
    pub size: usize,
    /// Function or data.
    pub kind: SymbolKind,
}

impl Symbol {
    /// Whether `addr` lies within `[address, address + size)`; never true for a zero size.
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.address && addr - self.address < self.size
    }
}

/// The symbols of one image with their lookup indexes.
#[derive(Debug, Default)]
pub(super) struct SymbolTable {
    /// Sorted by address, then name.
    symbols: Vec<Symbol>,
    functions: Containment,
    objects: Containment,
    /// Indexes into `symbols`, sorted by (name, preference, address).
    by_name: Vec<u32>,
    /// Indexes into `symbols`, sorted by (demangled, preference, address).
    by_demangled: Vec<u32>,
}

impl SymbolTable {
    /// Relocates `raw` by `bias`, demangles, drops duplicates (the same name at the same address,
    /// as `.symtab` and `.dynsym` both list exported symbols) and builds the indexes.
    pub fn new(raw: Vec<RawSymbol>, bias: usize) -> SymbolTable {
        let mut entries: Vec<(Symbol, u8)> = raw
            .into_iter()
            .filter_map(|r| {
                let address = usize::try_from(r.value).ok()?.checked_add(bias)?;
                let size = usize::try_from(r.size).ok()?;
                Some((
                    Symbol {
                        demangled: demangle(&r.name),
                        name: r.name,
                        address,
                        size,
                        kind: r.kind,
                    },
                    r.preference,
                ))
            })
            .collect();
        entries.sort_unstable_by(|(a, pa), (b, pb)| {
            (a.address, &a.name, pa).cmp(&(b.address, &b.name, pb))
        });
        // Keeps the first, i.e. best-preferred, of each (address, name).
        entries.dedup_by(|later, first| {
            later.0.address == first.0.address && later.0.name == first.0.name
        });

        let (symbols, preference): (Vec<Symbol>, Vec<u8>) = entries.into_iter().unzip();
        let index_sorted_by = |key: fn(&Symbol) -> &str| {
            let mut index: Vec<u32> = (0..symbols.len() as u32).collect();
            index.sort_unstable_by(|&a, &b| {
                let (sa, sb) = (&symbols[a as usize], &symbols[b as usize]);
                (key(sa), preference[a as usize], sa.address).cmp(&(
                    key(sb),
                    preference[b as usize],
                    sb.address,
                ))
            });
            index
        };
        let by_name = index_sorted_by(|s| &s.name);
        let by_demangled = index_sorted_by(|s| &s.demangled);
        SymbolTable {
            functions: Containment::new(&symbols, SymbolKind::Function),
            objects: Containment::new(&symbols, SymbolKind::Object),
            symbols,
            by_name,
            by_demangled,
        }
    }

    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// Exact match on the raw name first, then on the demangled name. Among several matches the
    /// preferred binding (global, then weak, then local; default symbol versions first) and then
    /// the lowest address wins.
    pub fn by_name(&self, name: &str) -> Option<&Symbol> {
        self.lookup(&self.by_name, name, |s| &s.name)
            .or_else(|| self.lookup(&self.by_demangled, name, |s| &s.demangled))
    }

    fn lookup(&self, index: &[u32], name: &str, key: fn(&Symbol) -> &str) -> Option<&Symbol> {
        let at = index.partition_point(|&i| key(&self.symbols[i as usize]) < name);
        let symbol = &self.symbols[*index.get(at)? as usize];
        (key(symbol) == name).then_some(symbol)
    }

    /// The function whose `[address, address + size)` contains `addr`; the innermost one if
    /// function symbols nest.
    pub fn function_containing(&self, addr: usize) -> Option<&Symbol> {
        self.functions.find(&self.symbols, addr)
    }

    /// The data object containing `addr`.
    pub fn object_containing(&self, addr: usize) -> Option<&Symbol> {
        self.objects.find(&self.symbols, addr)
    }
}

/// Address containment for the sized symbols of one kind.
#[derive(Debug, Default)]
struct Containment {
    /// Indexes into the symbol vector, in address order, one per distinct (address, size).
    index: Vec<u32>,
    /// `reach[i]`: the largest end address among `index[..=i]`, so that a backward scan can stop
    /// as soon as nothing earlier can reach the queried address.
    reach: Vec<usize>,
}

impl Containment {
    fn new(symbols: &[Symbol], kind: SymbolKind) -> Containment {
        let mut index: Vec<u32> = Vec::new();
        let mut reach: Vec<usize> = Vec::new();
        let mut last: Option<(usize, usize)> = None;
        for (i, s) in symbols.iter().enumerate() {
            // Aliases (same range, other name) add nothing: the first, best-sorted one answers.
            if s.kind != kind || s.size == 0 || last == Some((s.address, s.size)) {
                continue;
            }
            last = Some((s.address, s.size));
            let end = s.address.saturating_add(s.size);
            reach.push(reach.last().map_or(end, |&r| r.max(end)));
            index.push(i as u32);
        }
        Containment { index, reach }
    }

    fn find<'a>(&self, symbols: &'a [Symbol], addr: usize) -> Option<&'a Symbol> {
        let n = self
            .index
            .partition_point(|&i| symbols[i as usize].address <= addr);
        for j in (0..n).rev() {
            if self.reach[j] <= addr {
                return None;
            }
            let s = &symbols[self.index[j] as usize];
            if s.contains(addr) {
                return Some(s);
            }
        }
        None
    }
}

/// `rustc_demangle`'s alternate form (no hash) for Rust names, the name itself otherwise.
fn demangle(name: &str) -> String {
    // Cheap pre-check: C names are the majority in libraries and never need the demangler.
    if name.starts_with("_R") || name.starts_with("_ZN") {
        if let Ok(d) = rustc_demangle::try_demangle(name) {
            return format!("{d:#}");
        }
    }
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(name: &str, value: u64, size: u64, kind: SymbolKind, preference: u8) -> RawSymbol {
        RawSymbol {
            name: name.to_owned(),
            value,
            size,
            kind,
            preference,
        }
    }

    #[test]
    fn dedups_relocates_and_finds_by_address_and_name() {
        use SymbolKind::*;
        let table = SymbolTable::new(
            vec![
                raw("outer", 0x100, 0x100, Function, 0),
                raw("inner", 0x140, 0x10, Function, 2),
                raw("outer", 0x100, 0x100, Function, 0), // .dynsym copy
                raw("outer_alias", 0x100, 0x100, Function, 1),
                raw("marker", 0x180, 0, Function, 0),
                raw("table", 0x300, 8, Object, 0),
                raw("_ZN4demo5thing17h0123456789abcdefE", 0x400, 4, Function, 2),
            ],
            0x1000,
        );
        assert_eq!(table.symbols().len(), 6);
        assert!(table
            .symbols()
            .windows(2)
            .all(|w| w[0].address <= w[1].address));
        let at = |a: usize| table.function_containing(a).map(|s| s.name.as_str());
        assert_eq!(at(0x1100), Some("outer"));
        assert_eq!(at(0x1145), Some("inner"));
        assert_eq!(at(0x1150), Some("outer"));
        assert_eq!(
            at(0x1180),
            Some("outer"),
            "zero-sized symbols never contain"
        );
        assert_eq!(at(0x1200), None);
        assert_eq!(at(0x1300), None, "objects are not functions");
        assert_eq!(table.object_containing(0x1307).unwrap().name, "table");
        assert_eq!(table.by_name("inner").unwrap().address, 0x1140);
        let rust = table.by_name("demo::thing").unwrap();
        assert_eq!(rust.name, "_ZN4demo5thing17h0123456789abcdefE");
        assert_eq!(table.by_name(&rust.name), Some(rust));
        assert!(table.by_name("demo").is_none());
    }

    #[test]
    fn name_lookup_prefers_default_version_then_low_address() {
        let table = SymbolTable::new(
            vec![
                raw("memcpy", 0x10, 4, SymbolKind::Function, 4), // hidden compat version
                raw("memcpy", 0x20, 4, SymbolKind::Function, 0),
                raw("dup", 0x40, 4, SymbolKind::Function, 2),
                raw("dup", 0x30, 4, SymbolKind::Function, 2),
            ],
            0,
        );
        assert_eq!(table.by_name("memcpy").unwrap().address, 0x20);
        assert_eq!(table.by_name("dup").unwrap().address, 0x30);
    }
}
