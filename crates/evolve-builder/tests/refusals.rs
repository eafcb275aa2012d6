//! What the builder refuses, each with its cause named, writing nothing.

mod common;

use common::Fixture;
use evolve_builder::ErrorKind;

#[test]
fn a_changed_unprepared_async_body_is_refused() {
    let fixture = Fixture::new("builder-async");
    fixture.edit(&[("a + 7 // fetch v1", "a + 8 // fetch v2")]);
    let error = fixture.build("async").unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error.kind(), ErrorKind::AsyncBodyChanged { functions } if functions.iter().any(|f| f.contains("shapes::fetch"))),
        "{message}"
    );
    assert!(message.contains("#[evolve::hot] async fn"), "{message}");
    assert!(!fixture.output("async").exists());
}

#[test]
fn a_rebuild_with_other_features_is_refused() {
    let fixture = Fixture::new("builder-features");
    fixture.edit(&[("x * 3 + 1 // free v1", "x * 4 + 1 // free v2")]);
    let mut options = fixture.options("features");
    options.overrides.features = Some(vec!["loud".into()]);
    let error = evolve_builder::build_patch(&options).unwrap_err();
    assert!(
        matches!(error.kind(), ErrorKind::Configuration { cause, .. } if cause == "features"),
        "{error}"
    );
    assert!(error.to_string().contains("loud"), "{error}");
    assert!(!fixture.output("features").exists());
}

#[test]
fn a_profile_changed_since_the_build_is_refused() {
    let fixture = Fixture::new("builder-profile");
    fixture.workspace.edit(
        "Cargo.toml",
        &[(
            "debug = \"line-tables-only\"",
            "debug = \"line-tables-only\"\nopt-level = 2",
        )],
    );
    fixture.edit(&[("x * 3 + 1 // free v1", "x * 4 + 1 // free v2")]);
    let error = fixture.build("profile").unwrap_err();
    assert!(
        matches!(error.kind(), ErrorKind::Configuration { cause, .. } if cause == "profile"),
        "{error}"
    );
    assert!(error.to_string().contains("profile `release`"), "{error}");
    assert!(!fixture.output("profile").exists());
}

#[test]
fn a_program_built_with_lto_is_refused() {
    let lto = [("CARGO_PROFILE_RELEASE_LTO", "fat")];
    let fixture = Fixture::with_env("builder-lto", &lto);
    fixture.edit(&[("x * 3 + 1 // free v1", "x * 4 + 1 // free v2")]);
    let mut options = fixture.options("lto");
    options
        .env
        .extend(lto.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let error = evolve_builder::build_patch(&options).unwrap_err();
    assert!(matches!(error.kind(), ErrorKind::Lto { .. }), "{error}");
    assert!(
        error.to_string().contains("link-time optimisation"),
        "{error}"
    );
    assert!(!fixture.output("lto").exists());
}

/// Flags rustc was given through `RUSTFLAGS` change code without changing symbol names: a
/// rebuild without them is another unit, refused as such.
#[test]
fn a_rebuild_with_other_rustflags_is_refused() {
    let flags = [("RUSTFLAGS", "--cfg evolve_fixture_flag")];
    let fixture = Fixture::with_env("builder-flags", &flags);
    fixture.edit(&[("x * 3 + 1 // free v1", "x * 4 + 1 // free v2")]);
    let error = fixture.build("flags").unwrap_err();
    assert!(
        matches!(error.kind(), ErrorKind::Configuration { cause, .. } if cause == "flags"),
        "{error}"
    );
    assert!(error.to_string().contains("evolve_fixture_flag"), "{error}");
    assert!(!fixture.output("flags").exists());
}
