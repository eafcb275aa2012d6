//! The builder tests' harness: a copy of the fixture workspace built with plain
//! `cargo build --release`, the binary as it runs (a hard link kept from before any rebuild),
//! and checks every patch must pass.
#![allow(dead_code)]

use evolve_builder::emit::SUPPORTED_RELOCATIONS;
use evolve_builder::program::Program;
use evolve_builder::{build_patch, Base, BuildOptions, BuildReport};
use evolve_testkit::Workspace;
use object::{Object, ObjectSection, ObjectSymbol};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// The fixture, built, with its running binary.
pub struct Fixture {
    pub workspace: Workspace,
    /// The program's binary as it was built (what `/proc/PID/exe` would reach).
    pub binary: PathBuf,
}

impl Fixture {
    pub fn new(name: &str) -> Fixture {
        Fixture::with_env(name, &[])
    }

    /// Built with extra environment (e.g. a profile setting).
    pub fn with_env(name: &str, env: &[(&str, &str)]) -> Fixture {
        let fixture = evolve_testkit::repository().join("crates/evolve-builder/tests/fixture");
        let workspace = Workspace::build_isolated(&fixture, name, env);
        let binary = workspace.dir.join("app.running");
        let built = workspace.target.join("release/app");
        let _ = std::fs::remove_file(&binary);
        if std::fs::hard_link(&built, &binary).is_err() {
            std::fs::copy(&built, &binary).unwrap();
        }
        Fixture { workspace, binary }
    }

    /// Edits `shapes/src/lib.rs`.
    pub fn edit(&self, edits: &[(&str, &str)]) {
        self.workspace.edit("shapes/src/lib.rs", edits);
    }

    /// Options for a patch written to `<dir>/<name>.o`.
    pub fn options(&self, name: &str) -> BuildOptions {
        let mut options = BuildOptions::new(
            self.workspace.dir.join("Cargo.toml"),
            Base::Path(self.binary.clone()),
            self.output(name),
        );
        options.env = vec![(
            "CARGO_TARGET_DIR".into(),
            self.workspace.target.display().to_string(),
        )];
        options
    }

    pub fn output(&self, name: &str) -> PathBuf {
        self.workspace.dir.join(format!("{name}.o"))
    }

    /// Builds a patch with the default options.
    pub fn build(&self, name: &str) -> evolve_builder::Result<BuildReport> {
        build_patch(&self.options(name))
    }
}

/// The carried functions' names.
pub fn carried(report: &BuildReport) -> BTreeSet<String> {
    report.carried.iter().map(|c| c.name.clone()).collect()
}

/// Asserts the patch carries exactly `changed` (each with reason `changed`) plus functions that
/// inline one of them (`inliners`, each with reason `inlines …`), and nothing else.
pub fn assert_carries(report: &BuildReport, changed: &[&str], inliners: &[&str]) {
    let listing: Vec<String> = report
        .carried
        .iter()
        .map(|c| format!("{} ({}; {:?})", c.name, c.reason, c.detail))
        .collect();
    let roots: BTreeSet<&str> = report
        .carried
        .iter()
        .filter(|c| c.reason == "changed")
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        roots,
        changed.iter().copied().collect(),
        "changed functions: {listing:#?}"
    );
    let others: BTreeSet<&str> = report
        .carried
        .iter()
        .filter(|c| c.reason != "changed")
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        others,
        inliners.iter().copied().collect(),
        "other carried functions: {listing:#?}"
    );
    for c in report.carried.iter().filter(|c| c.reason != "changed") {
        assert!(
            changed
                .iter()
                .chain(["shapes::scale"].iter())
                .any(|root| c.reason == format!("inlines {root}")),
            "{} is carried for another reason than inlining a changed function: {}",
            c.name,
            c.reason
        );
    }
}

/// The checks every written patch must pass: an `ET_REL` whose defined functions are exactly
/// the carried ones (replacements as `__evolve_new__<symbol>`), whose undefined symbols all
/// exist in the program's symbol table (local ones included), whose relocations are all of
/// types the loader applies, and whose manifest's digest is right.
pub fn check_patch(fixture: &Fixture, report: &BuildReport) {
    let path = report.output.as_ref().expect("a patch was written");
    let bytes = std::fs::read(path).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    assert_eq!(file.kind(), object::ObjectKind::Relocatable);
    let program = Program::read(&fixture.binary).unwrap();
    let mut defined_functions = BTreeSet::new();
    for symbol in file.symbols() {
        let name = symbol.name().unwrap();
        if symbol.is_undefined() {
            if !name.is_empty() {
                assert!(
                    program.provides(name),
                    "the patch needs {name}, which the program neither defines nor imports"
                );
            }
        } else if symbol.kind() == object::SymbolKind::Text && !name.is_empty() {
            defined_functions.insert(name.to_string());
        }
    }
    let expected: BTreeSet<String> = report
        .carried
        .iter()
        .map(|c| {
            if c.replaces {
                format!("__evolve_new__{}", c.symbol)
            } else {
                c.symbol.clone()
            }
        })
        .collect();
    assert_eq!(defined_functions, expected, "the patch's functions");
    for section in file.sections() {
        for (offset, relocation) in section.relocations() {
            let object::RelocationFlags::Elf { r_type } = relocation.flags() else {
                panic!("not an ELF relocation");
            };
            assert!(
                SUPPORTED_RELOCATIONS.contains(&r_type),
                "{}+{offset:#x}: relocation type {r_type} is not one the loader applies",
                section.name().unwrap()
            );
        }
    }
    for section in file.sections() {
        let name = section.name().unwrap();
        assert!(
            !name.starts_with(".debug") && !name.contains("init_array") && !name.contains("ctors"),
            "the patch has a section {name}"
        );
    }
    // Unwind information for exactly the carried functions: one FDE each, describing the
    // patch's own copy.
    let eh_frame = file
        .section_by_name(".eh_frame")
        .expect("the patch has .eh_frame");
    let mut described = BTreeSet::new();
    for (_, relocation) in eh_frame.relocations() {
        let object::RelocationTarget::Symbol(index) = relocation.target() else {
            continue;
        };
        let symbol = file.symbol_by_index(index).unwrap();
        if let object::SymbolSection::Section(section) = symbol.section() {
            if file.section_by_index(section).unwrap().kind() == object::SectionKind::Text {
                described.insert(section.0);
            }
        }
    }
    let text_sections: BTreeSet<_> = file
        .sections()
        .filter(|s| s.kind() == object::SectionKind::Text && s.size() > 0)
        .map(|s| s.index().0)
        .collect();
    assert_eq!(described, text_sections, "FDEs cover the carried functions");
    let applied = evolve_builder::read_applied(path).expect("the digest verifies");
    assert_eq!(applied.manifest, report.manifest);
    assert_eq!(applied.manifest.base_build_id, program.build_id);
    assert_eq!(applied.manifest.format, 2);
}
