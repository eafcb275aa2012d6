//! Every bad patch is refused with a message naming its cause, and the process keeps serving
//! on the code it had.

mod common;

use common::{Fixture, Host, V2};
use std::path::Path;

/// Applies `path`, expects a refusal containing `cause`, and checks the host still serves v1.
fn refused(host: &mut Host, path: &Path, cause: &str) {
    let before = host.send("stats");
    let answer = host.send(&format!("apply {}", path.display()));
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains(cause), "{error:?} does not name {cause:?}");
    let after = host.stats_after(150);
    assert_eq!(after["version"], 1, "{after}");
    assert_eq!(after["errors"], 0, "{after}");
    assert!(
        after["calls"].as_u64() > before["calls"].as_u64(),
        "the host stopped serving"
    );
    assert_eq!(host.send("probe")["compute"], 20);
}

/// A copy of `patch` with `old` replaced by `new` (same length) in its bytes.
fn doctored(patch: &Path, name: &str, old: &str, new: &str) -> std::path::PathBuf {
    assert_eq!(old.len(), new.len());
    let mut bytes = std::fs::read(patch).unwrap();
    let at = bytes
        .windows(old.len())
        .position(|w| w == old.as_bytes())
        .unwrap_or_else(|| panic!("{old:?} not in the patch"));
    bytes[at..at + old.len()].copy_from_slice(new.as_bytes());
    let path = patch.with_file_name(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A copy of `patch` whose first `__evolve_stub_*` function's bytes are all `0xff`.
fn damaged_stub(patch: &Path, name: &str) -> std::path::PathBuf {
    use object::{Object, ObjectSection, ObjectSymbol};
    let mut bytes = std::fs::read(patch).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    let stub = file
        .symbols()
        .find(|s| s.name().is_ok_and(|n| n.starts_with("__evolve_stub_")))
        .expect("the patch has a stub");
    let section = file
        .section_by_index(stub.section_index().unwrap())
        .unwrap();
    let at = (section.file_range().unwrap().0 + stub.address() - section.address()) as usize;
    drop(file);
    bytes[at..at + 5].fill(0xff);
    let path = patch.with_file_name(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_patch_damaged_outside_its_manifest_is_refused_as_corrupt_not_by_the_check_it_trips() {
    let fixture = Fixture::new("damaged");
    let mut host = fixture.start();
    host.stats_after(100);
    fixture.edit(V2);
    let good = fixture.build_patch(&host, "good").unwrap().output;
    // The patch's own stub overwritten: before the digest, apply refused it only when binding
    // ("… holds [ff ff ff ff ff], which is not a 5-byte jmp"), after loading it.
    let damaged = damaged_stub(&good, "damaged.so");
    let err = evolve_hot::patch::read_manifest(&damaged).unwrap_err();
    assert!(
        matches!(err.kind(), evolve_hot::ErrorKind::Corrupt { .. }),
        "{err}"
    );
    refused(
        &mut host,
        &damaged,
        "is corrupt: its contents do not match its manifest's SHA-256",
    );
    let answer = host.send(&format!("apply {}", good.display()));
    assert_eq!(answer["ok"], true, "{answer}");
}

#[test]
fn bad_patches_are_refused_by_cause_and_the_process_keeps_serving() {
    let fixture = Fixture::new("refusals");
    let mut host = fixture.start();
    host.stats_after(100);

    // Not a patch at all: a text file, and a shared library without a manifest.
    let text = fixture.dir.join("notes.txt");
    std::fs::write(&text, "not a patch").unwrap();
    refused(&mut host, &text, "is not an Evolve patch");
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.exists())
    .expect("libm");
    refused(&mut host, libm, "has no Evolve manifest");

    // A good patch to doctor.
    let pristine = std::fs::read_to_string(fixture.dir.join("hotfix/src/lib.rs")).unwrap();
    fixture.edit(V2);
    let good = fixture.build_patch(&host, "good").unwrap().output;
    let manifest = evolve_hot::patch::read_manifest(&good).unwrap();

    let truncated = fixture.dir.join("truncated.so");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    refused(&mut host, &truncated, "truncated.so");

    let corrupt = doctored(&good, "corrupt.so", "\"crates\":[", "\"crates\":{");
    refused(&mut host, &corrupt, "is corrupt: manifest");

    // A FIFO is refused at once, before anything is read (the request does not hang).
    let fifo = fixture.dir.join("fifo.so");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        0,
    )
    .unwrap();
    refused(&mut host, &fifo, "it is a FIFO, not a regular file");

    let zeros = "0".repeat(manifest.base_build_id.len());
    let other_base = doctored(&good, "other-base.so", &manifest.base_build_id, &zeros);
    refused(&mut host, &other_base, &format!("built for binary {zeros}"));

    let other_toolchain = doctored(&good, "other-toolchain.so", "\"rustc 1.", "\"rustc 0.");
    refused(&mut host, &other_toolchain, "built with `rustc 0.");

    // A changed signature without an adaptor.
    std::fs::write(fixture.dir.join("hotfix/src/lib.rs"), &pristine).unwrap();
    fixture.edit(&[(
        "pub fn compute(x: u64) -> u64 {",
        "pub fn compute(x: u64, _unused: u32) -> u64 {",
    )]);
    let signature = fixture.build_patch(&host, "signature").unwrap().output;
    refused(
        &mut host,
        &signature,
        "hotfix::compute changed its signature",
    );

    // A static whose layout changed, without a transfer function: the builder says so, apply
    // refuses.
    std::fs::write(fixture.dir.join("hotfix/src/lib.rs"), &pristine).unwrap();
    fixture.edit(&[
        (
            "pub static CALLS: AtomicU64 = AtomicU64::new(0);",
            "pub static CALLS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];",
        ),
        (
            "    CALLS.fetch_add(1, Ordering::Relaxed);",
            "    CALLS[0].fetch_add(1, Ordering::Relaxed);",
        ),
        (
            "    CALLS.load(Ordering::Relaxed)\n}",
            "    CALLS[0].load(Ordering::Relaxed)\n}",
        ),
    ]);
    let layout = fixture.build_patch(&host, "layout").unwrap();
    assert!(
        layout
            .warnings
            .iter()
            .any(|w| w.contains("CALLS") && w.contains("8 -> 16")),
        "{:?}",
        layout.warnings
    );
    refused(
        &mut host,
        &layout.output,
        "hotfix::CALLS changed its type or layout (8 -> 16 bytes)",
    );

    // A symbol the host does not have: refused before anything is written.
    std::fs::write(fixture.dir.join("hotfix/src/lib.rs"), &pristine).unwrap();
    fixture.edit(&[(
        "helper(x) * 2 // v1",
        "helper(hotdep::not_linked_into_host(x)) * 2",
    )]);
    let error = fixture
        .build_patch(&host, "unresolved")
        .unwrap_err()
        .to_string();
    assert!(error.contains("not_linked_into_host"), "{error}");
    assert!(!fixture.dir.join("unresolved.so").exists());

    // And the good patch still applies after all that.
    let answer = host.send(&format!("apply {}", good.display()));
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(host.stats_after(200)["version"], 2);
}

#[test]
fn a_changed_signature_with_an_adaptor_is_applied_and_old_callers_reach_the_new_code() {
    let fixture = Fixture::new("adaptor");
    let mut host = fixture.start();
    host.stats_after(100);
    fixture.edit(&[
        (
            "pub fn compute(x: u64) -> u64 {",
            "pub fn compute(x: u64, factor: u64) -> u64 {",
        ),
        ("helper(x) * 2 // v1", "helper(x) * factor"),
        ("1 // v1", "2 // v2"),
        (
            "#[inline(never)]\nfn helper",
            "/// The old signature: callers compiled against it triple now.\n\
             #[evolve::adaptor(compute)]\n\
             fn compute_before_factors(x: u64) -> u64 {\n    compute(x, 3)\n}\n\n\
             #[inline(never)]\nfn helper",
        ),
    ]);
    let patch = fixture.build_patch(&host, "adaptor").unwrap();
    assert_eq!(patch.manifest.adaptors.len(), 1, "{:?}", patch.manifest);
    let answer = host.send(&format!("apply {}", patch.output.display()));
    assert_eq!(answer["ok"], true, "{answer}");
    // The host's callers use the old signature: they reach the adaptor, which calls the new
    // function with factor 3.
    assert_eq!(host.send("probe")["compute"], 30);
    let stats = host.stats_after(200);
    assert_eq!(stats["version"], 2);
    assert_eq!(stats["errors"], 0, "{stats}");
    assert_eq!(host.send("revert")["ok"], true);
    assert_eq!(host.send("probe")["compute"], 20);
}

#[test]
fn a_static_whose_type_changed_is_converted_by_its_transfer_function() {
    let fixture = Fixture::new("transfer");
    let mut host = fixture.start();
    let before = host.stats_after(200)["calls_fn"].as_u64().unwrap();
    assert!(before > 0);
    fixture.edit(&[
        (
            "pub static CALLS: AtomicU64 = AtomicU64::new(0);",
            "pub static CALLS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];\n\n\
             /// v1 counted in one word; v2 keeps the old count and counts anew in the second.\n\
             #[evolve::transfer(CALLS)]\n\
             fn calls_from_v1(old: &AtomicU64) -> [AtomicU64; 2] {\n    \
             [AtomicU64::new(old.load(Ordering::Relaxed)), AtomicU64::new(0)]\n}",
        ),
        (
            "    CALLS.fetch_add(1, Ordering::Relaxed);",
            "    CALLS[1].fetch_add(1, Ordering::Relaxed);",
        ),
        (
            "    CALLS.load(Ordering::Relaxed)\n}",
            "    CALLS[0].load(Ordering::Relaxed) + CALLS[1].load(Ordering::Relaxed)\n}",
        ),
        ("1 // v1", "2 // v2"),
    ]);
    let patch = fixture.build_patch(&host, "transfer").unwrap();
    assert!(patch.warnings.is_empty(), "{:?}", patch.warnings);
    assert_eq!(patch.manifest.transfers.len(), 1);
    let answer = host.send(&format!("apply {}", patch.output.display()));
    assert_eq!(answer["ok"], true, "{answer}");
    let after = host.stats_after(200);
    assert_eq!(after["version"], 2);
    assert_eq!(after["errors"], 0, "{after}");
    // The count carried over into the new layout and kept growing: not restarted from zero.
    let carried = after["calls_fn"].as_u64().unwrap();
    assert!(carried > before, "{before} -> {carried}");
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(host.send("stats")["calls_fn"].as_u64().unwrap() > carried);
}
