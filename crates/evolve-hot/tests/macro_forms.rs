//! Forms of `#[evolve::hot]` that gave raw compiler errors: a function with a lifetime
//! parameter (E0261 on the generated stub), an impl block with one, and a block holding a method
//! the attribute cannot prepare (a generic one sank the whole block with cascading errors).

mod common;

use common::Fixture;
use serde_json::json;

#[test]
fn lifetime_parameters_and_unpreparable_methods_in_a_hot_block() {
    let fixture = Fixture::new("macro-forms");
    let mut host = fixture.start();
    assert_eq!(
        host.send("words tree pine"),
        json!({"longer": "tree", "first": "tree", "long_words": 2})
    );

    // v2: ties go to the second word; "first" becomes the last word.
    fixture.edit(&[
        ("if b.len() > a.len() {", "if b.len() >= a.len() {"),
        (
            "self.text.split(' ').next().unwrap_or(\"\") // first",
            "self.text.split(' ').last().unwrap_or(\"\") // first",
        ),
    ]);
    let report = fixture.build_patch(&host, "forms").unwrap();
    let ids: Vec<&str> = report
        .manifest
        .functions
        .iter()
        .map(|f| f.id.as_str())
        .collect();
    assert!(
        ids.iter().any(|id| id.contains("longer")) && ids.iter().any(|id| id.contains("first")),
        "{ids:?}"
    );
    assert!(!ids.iter().any(|id| id.contains("count_where")), "{ids:?}");
    let applied = host.send(&format!("apply {}", report.output.display()));
    assert_eq!(applied["ok"], true, "{applied}");
    assert_eq!(
        host.send("words tree pine"),
        json!({"longer": "pine", "first": "pine", "long_words": 2})
    );
    assert_eq!(host.stats_after(100)["errors"], 0);
}
