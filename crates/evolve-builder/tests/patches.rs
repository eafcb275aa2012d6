//! Patches built against real builds of a program that knows nothing of Evolve (plain
//! `cargo build --release`): each carries exactly the functions whose code changed, and those
//! that inlined them.

mod common;

use common::{assert_carries, carried, check_patch, Fixture};

#[test]
fn unchanged_source_reproduces_the_program_function_by_function() {
    let fixture = Fixture::new("builder-unchanged");
    let error = fixture.build("same").unwrap_err();
    match error.kind() {
        evolve_builder::ErrorKind::NothingChanged { compared } => {
            assert!(*compared > 10, "only {compared} functions compared")
        }
        other => panic!("{other:?}"),
    }
    assert!(!fixture.output("same").exists());
}

#[test]
fn a_free_function() {
    let fixture = Fixture::new("builder-free");
    fixture.edit(&[("x * 3 + 1 // free v1", "x * 4 + 1 // free v2")]);
    let report = fixture.build("free").unwrap();
    assert_carries(&report, &["shapes::free"], &[]);
    assert_eq!(report.manifest.crates, ["shapes"]);
    assert_eq!(report.manifest.replaced[0].expected.version, "program");
    check_patch(&fixture, &report);
}

#[test]
fn an_inherent_method() {
    let fixture = Fixture::new("builder-inherent");
    fixture.edit(&[("self.n += 2; // step v1", "self.n += 5; // step v2")]);
    let report = fixture.build("step").unwrap();
    assert_carries(&report, &["shapes::Counter::step"], &[]);
    check_patch(&fixture, &report);
}

/// `area` is called through `dyn Shape` (its vtable) and through the generic `app::measure`:
/// only the method itself changes; both callers reach it through its entry.
#[test]
fn a_trait_impl_method_called_through_dyn_and_a_generic() {
    let fixture = Fixture::new("builder-trait");
    fixture.edit(&[(
        "self.0 * self.0 // area v1",
        "self.0 * self.0 + 1 // area v2",
    )]);
    let report = fixture.build("area").unwrap();
    assert_carries(&report, &["<shapes::Square as shapes::Shape>::area"], &[]);
    check_patch(&fixture, &report);
}

#[test]
fn a_closure() {
    let fixture = Fixture::new("builder-closure");
    fixture.edit(&[(
        "apply_dyn(&move |v| v + k, x) // closure v1",
        "apply_dyn(&move |v| v * 2 + k, x) // closure v2",
    )]);
    let report = fixture.build("closure").unwrap();
    let names = carried(&report);
    assert!(
        names.contains("shapes::with_closure::{{closure}}"),
        "{names:?}"
    );
    // The `dyn FnOnce` shim of the closure inlines it.
    assert_carries(
        &report,
        &["shapes::with_closure::{{closure}}"],
        &["core::ops::function::FnOnce::call_once{{vtable.shim}}"],
    );
    check_patch(&fixture, &report);
}

/// `twice::<u32>` is instantiated in the binary crate, which calls it: its code is there.
#[test]
fn a_generic_instance() {
    let fixture = Fixture::new("builder-generic");
    fixture.edit(&[("x.into() * 2 // twice v1", "x.into() * 3 // twice v2")]);
    let report = fixture.build("twice").unwrap();
    assert_carries(&report, &["shapes::twice"], &[]);
    assert_eq!(report.carried[0].krate, "app");
    check_patch(&fixture, &report);
}

#[test]
fn a_function_of_the_binary_crate() {
    let fixture = Fixture::new("builder-bin");
    fixture.workspace.edit(
        "app/src/main.rs",
        &[(
            "format!(\"{label}={value}\") // report v1",
            "format!(\"{label}: {value}\") // report v2",
        )],
    );
    let report = fixture.build("report").unwrap();
    assert_carries(&report, &["app::report"], &[]);
    assert_eq!(report.manifest.crates, ["app"]);
    check_patch(&fixture, &report);
}

/// `scale` has no code of its own: its callers carry it, and say so.
#[test]
fn a_function_inlined_into_its_callers() {
    let fixture = Fixture::new("builder-inlined");
    fixture.edit(&[(">> 7 // scale v1", ">> 9 // scale v2")]);
    let report = fixture.build("scale").unwrap();
    assert_carries(&report, &[], &["shapes::scaled_sum", "shapes::scaled_one"]);
    for c in &report.carried {
        assert_eq!(c.reason, "inlines shapes::scale", "{}", c.name);
    }
    check_patch(&fixture, &report);
}

/// `hit` changed; `HITS`, the private static it counts in, did not: the patch binds to the
/// program's (it is an undefined symbol of the patch, no copy of it is carried).
#[test]
fn a_changed_private_statics_user_binds_to_the_programs_static() {
    use object::{Object, ObjectSymbol};
    let fixture = Fixture::new("builder-static");
    fixture.edit(&[(
        "HITS.fetch_add(1, Ordering::Relaxed) + 1 // hit v1",
        "HITS.fetch_add(1, Ordering::Relaxed) + 100 // hit v2",
    )]);
    let report = fixture.build("hit").unwrap();
    assert_carries(&report, &["shapes::hit"], &[]);
    assert!(report.manifest.new_statics.is_empty());
    check_patch(&fixture, &report);
    let bytes = std::fs::read(report.output.as_ref().unwrap()).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    let hits: Vec<_> = file
        .symbols()
        .filter(|s| {
            s.name()
                .is_ok_and(|n| format!("{:#}", rustc_demangle::demangle(n)) == "shapes::HITS")
        })
        .collect();
    assert_eq!(hits.len(), 1, "one symbol for HITS");
    assert!(hits[0].is_undefined(), "HITS is the program's, not a copy");
}

/// A second patch is compared with the first one's version, not the program's: building it
/// again unchanged finds nothing, an edit carries the function with the first patch as the
/// expected version.
#[test]
fn stacked_patches_are_compared_with_the_applied_version() {
    let fixture = Fixture::new("builder-stacked");
    fixture.edit(&[("x * 3 + 1 // free v1", "x * 4 + 1 // free v2")]);
    let first = fixture.build("first").unwrap();
    let first_path = first.output.clone().unwrap();

    let mut options = fixture.options("again");
    options.applied = vec![first_path.clone()];
    let error = evolve_builder::build_patch(&options).unwrap_err();
    assert!(
        matches!(
            error.kind(),
            evolve_builder::ErrorKind::NothingChanged { .. }
        ),
        "{error}"
    );

    fixture.edit(&[("x * 4 + 1 // free v2", "x * 5 + 1 // free v3")]);
    let mut options = fixture.options("second");
    options.applied = vec![first_path];
    let second = evolve_builder::build_patch(&options).unwrap();
    assert_carries(&second, &["shapes::free"], &[]);
    assert_eq!(
        second.manifest.replaced[0].expected.version,
        first.manifest.sha256
    );
    check_patch(&fixture, &second);
}

#[test]
fn a_dry_run_lists_the_carried_functions_and_writes_nothing() {
    let fixture = Fixture::new("builder-dry-run");
    fixture.edit(&[(">> 7 // scale v1", ">> 8 // scale v2")]);
    let mut options = fixture.options("dry");
    options.dry_run = true;
    let report = evolve_builder::build_patch(&options).unwrap();
    assert!(report.output.is_none());
    assert!(!fixture.output("dry").exists());
    assert_eq!(
        carried(&report),
        ["shapes::scaled_one", "shapes::scaled_sum"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}

/// A static whose type changed is not silently a fresh copy: the manifest lists it for a
/// transfer function (the legacy mangling renamed it, so it is matched by its path).
#[test]
fn a_static_whose_layout_changed_is_listed_for_a_transfer() {
    let fixture = Fixture::new("builder-layout");
    fixture.edit(&[
        (
            "static HITS: AtomicU64 = AtomicU64::new(0);",
            "static HITS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];",
        ),
        (
            "HITS.fetch_add(1, Ordering::Relaxed) + 1 // hit v1",
            "HITS[1].fetch_add(1, Ordering::Relaxed) + 1 // hit v2",
        ),
    ]);
    let report = fixture.build("layout").unwrap();
    assert_eq!(
        common::carried(&report),
        ["shapes::hit".to_string()].into_iter().collect()
    );
    assert_eq!(
        report.carried[0].reason,
        "uses the static shapes::HITS, whose layout changed"
    );
    let changed = &report.manifest.changed_statics;
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed[0].symbol, "shapes::HITS");
    assert_eq!((changed[0].running, changed[0].patch), (8, 16));
    assert!(
        report.warnings.iter().any(|w| w.contains("shapes::HITS")),
        "{:?}",
        report.warnings
    );
    check_patch(&fixture, &report);
}
