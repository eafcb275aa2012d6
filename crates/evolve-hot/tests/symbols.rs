//! How the builder matches a patch's symbols with the running program's: regressions found when
//! Evolve was first tried as a new user would, on a third-party server.

mod common;

use common::Fixture;
use object::{Object, ObjectSymbol, SymbolKind};
use std::path::Path;

/// The patch's undefined symbols, with their kinds.
fn undefined(patch: &Path) -> Vec<(String, SymbolKind)> {
    let data = std::fs::read(patch).unwrap();
    let file = object::File::parse(&*data).unwrap();
    file.dynamic_symbols()
        .filter(|s| s.is_undefined())
        .filter_map(|s| Some((s.name().ok()?.to_string(), s.kind())))
        .collect()
}

/// glibc's string functions are IFUNC symbols and `thread_local!`s are TLS symbols: the builder
/// counted both as missing ("needs symbols the running program does not have: memmove, …
/// __RUST_STD_INTERNAL_VAL") and refused every patch of a crate that used them.
#[test]
fn ifunc_and_tls_symbols_are_not_counted_as_missing() {
    let fixture = Fixture::new("symbols-ifunc-tls");
    let mut host = fixture.start();
    // "a b a": two distinct words; the host thread's tally grows by one per call.
    for calls in 1..=3 {
        assert_eq!(host.send("tally a b a")["result"], 2000 + calls);
    }

    fixture.edit(&[(
        "words.len() as u64 * 1000 +",
        "words.len() as u64 * 100_000 +",
    )]);
    let report = fixture
        .build_patch(&host, "tally")
        .unwrap_or_else(|e| panic!("a patch using IFUNC and TLS symbols was refused: {e}"));

    // The case is really exercised: the patch needs the C library's IFUNCs and a dependency's
    // thread-local from the program.
    let needs = undefined(&report.output);
    for ifunc in ["memmove", "memset", "bcmp"] {
        assert!(
            needs.iter().any(|(name, _)| name == ifunc),
            "the patch does not need {ifunc}: {needs:?}"
        );
    }
    assert!(
        needs
            .iter()
            .any(|(name, kind)| *kind == SymbolKind::Tls && name.contains("TALLIES")),
        "the patch does not need hotdep's TLS symbol: {needs:?}"
    );

    let applied = host.send(&format!("apply {}", report.output.display()));
    assert_eq!(applied["ok"], true, "{applied}");
    // The new code, and the program's own thread-local: the tally goes on from 3.
    assert_eq!(host.send("tally a b a")["result"], 200_004);
    assert_eq!(host.stats_after(100)["errors"], 0);
}

/// Two expansions of one macro in one function (two `tracing` calls, each with its `CALLSITE`)
/// are two statics with one demangled path. Matched by path, one was taken for the other and
/// reported as "static … changed its type or layout (24 -> 24 bytes)": a warning at build time
/// and a refusal at apply. Matched by exact symbol, each binds to its own.
#[test]
fn statics_with_one_path_are_matched_by_symbol() {
    let fixture = Fixture::new("symbols-statics");
    let mut host = fixture.start();
    assert_eq!(host.send("sites")["result"], 1001);
    assert_eq!(host.send("sites")["result"], 2002);

    // Unchanged source: nothing changed its layout.
    let report = fixture.build_patch(&host, "same").unwrap();
    assert!(
        report.manifest.changed_statics.is_empty(),
        "{:?}",
        report.manifest.changed_statics
    );
    // The source is unchanged, so the builder says the patch replaces nothing; what this test
    // is about is that no static is reported as changed.
    let statics: Vec<_> = report
        .warnings
        .iter()
        .filter(|w| w.contains("static"))
        .collect();
    assert!(statics.is_empty(), "{:?}", report.warnings);
    let applied = host.send(&format!("apply {}", report.output.display()));
    assert_eq!(applied["ok"], true, "{applied}");
    // Both counters are the program's: they go on from 2.
    assert_eq!(host.send("sites")["result"], 3003);
    assert_eq!(host.stats_after(100)["errors"], 0);
}
