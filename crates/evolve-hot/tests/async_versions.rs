//! `#[evolve::hot] async fn`: futures in flight when a patch lands finish on the version they
//! started with; calls made afterwards get futures of the new version.

mod common;

use common::Fixture;
use serde_json::Value;

#[test]
fn futures_in_flight_finish_on_their_version_and_new_calls_get_the_new_one() {
    let fixture = Fixture::new("async-versions");
    let mut host = fixture.start();
    assert_eq!(host.send("async-start 1000")["in_flight"], 1000);

    fixture.edit(&[
        ("(id, 1) // async v1", "(id, 2) // async v2"),
        (
            "format!(\"hello from {}\", self.name) // greeter v1",
            "format!(\"hi from {}\", self.name) // greeter v2",
        ),
    ]);
    let report = fixture.build_patch(&host, "async").unwrap();
    let ids: Vec<&str> = report
        .manifest
        .functions
        .iter()
        .map(|f| f.id.as_str())
        .collect();
    assert!(
        ids.iter().any(|id| id.contains("versioned_after"))
            && ids.iter().any(|id| id.contains("greet_after")),
        "{ids:?}"
    );
    let applied = host.send(&format!("apply {}", report.output.display()));
    assert_eq!(applied["ok"], true, "{applied}");
    assert_eq!(host.send("async-start 1000")["in_flight"], 2000);

    let finished = host.send("async-finish");
    let finished = finished["finished"].as_array().unwrap();
    assert_eq!(finished.len(), 2000);
    for (i, call) in finished.iter().enumerate() {
        let call: Vec<Value> = call.as_array().unwrap().clone();
        assert_eq!(call[0], i as u64);
        // The first thousand were in flight when the patch landed: both their futures were
        // made by v1 and finish on v1; the next thousand were made by v2.
        let (version, greeting) = if i < 1000 {
            (1, "hello from host")
        } else {
            (2, "hi from host")
        };
        assert_eq!(
            (call[1].as_u64().unwrap(), call[2].as_str().unwrap()),
            (version, greeting),
            "call {i}"
        );
    }
    assert_eq!(host.stats_after(100)["errors"], 0);
}
