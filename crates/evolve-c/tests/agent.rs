//! The agent of a C program (`evolve_start()`): the `evolve` commands reach its C switches,
//! multiversed and hot functions.

mod common;

use common::{build, scratch, stress_threads};
use evolve_agent::client::Connection;
use evolve_agent::protocol::Request;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn switch_and_commit_through_the_agent_change_a_c_program() {
    let scratch = scratch("agent");
    let exe = build("agent", &scratch.dir, "");
    let sockets = scratch.dir.join("sockets");
    let mut child = Command::new(&exe)
        .env("EVOLVE_SOCKET_DIR", &sockets)
        .env("EVOLVE_STRESS_THREADS", stress_threads().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the C program");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next().unwrap().unwrap();
    assert!(ready.starts_with("ready pid="), "{ready}");
    let mut ask = |lines: &mut std::io::Lines<_>| -> String {
        writeln!(stdin, "call").unwrap();
        lines.next().unwrap().unwrap()
    };
    assert_eq!(ask(&mut lines), "level=1 scaled=2 committed=0 handler=5");

    let socket = evolve_agent::paths::socket_path(&sockets, child.id());
    let mut agent = Connection::connect(&socket).expect("the agent's socket");
    let timeout = Duration::from_secs(30);
    let functions = agent
        .call(&Request::Functions { symbols: None }, timeout)
        .unwrap();
    let text = functions.to_string();
    assert!(
        text.contains("\"scaled\"") && text.contains("\"handler\""),
        "{text}"
    );

    let status = agent.call(&Request::Status, timeout).unwrap().to_string();
    assert!(status.contains("\"level\""), "{status}");
    agent
        .call(
            &Request::SwitchSet {
                name: "level".into(),
                value: "3".into(),
            },
            timeout,
        )
        .unwrap();
    let refused = agent.call(
        &Request::SwitchSet {
            name: "level".into(),
            value: "9".into(),
        },
        timeout,
    );
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("not in the domain"),
        "a value outside the domain is refused"
    );
    let committed = agent
        .call(
            &Request::Commit {
                switch: Some("level".into()),
            },
            timeout,
        )
        .unwrap()
        .to_string();
    assert!(committed.contains("scaled"), "{committed}");
    assert_eq!(ask(&mut lines), "level=3 scaled=6 committed=1 handler=5");
    agent
        .call(&Request::RevertSwitches { switch: None }, timeout)
        .unwrap();
    assert_eq!(ask(&mut lines), "level=3 scaled=6 committed=0 handler=5");
    writeln!(stdin, "quit").unwrap();
    assert!(child.wait().unwrap().success());
    assert!(!socket.exists(), "the socket is removed at exit");
}
