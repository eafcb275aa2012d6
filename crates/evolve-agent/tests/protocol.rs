//! The agent in this test process, driven over its socket with raw lines: every bad request
//! gets an error reply and the agent keeps serving.

use evolve_agent::client::Connection;
use evolve_agent::protocol::{ErrorKind, ProbeKindName, Request, MAX_LINE};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

fn agent(name: &str) -> evolve_agent::Agent {
    let dir = std::env::temp_dir().join(format!("evolve-agent-test-{}-{name}", std::process::id()));
    evolve_agent::start_in(dir).expect("agent starts")
}

fn kind(reply: &evolve_agent::protocol::Reply) -> ErrorKind {
    assert!(!reply.ok, "{reply:?}");
    reply.error.as_ref().unwrap().kind
}

#[test]
fn socket_is_private_and_removed_when_the_agent_stops() {
    let agent = agent("private");
    let socket = agent.socket().to_path_buf();
    assert_eq!(
        socket.file_name().unwrap().to_str().unwrap(),
        format!("{}.sock", std::process::id())
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let mut c = Connection::connect(&socket).unwrap();
    let hello = c.call(&Request::Hello, T).unwrap();
    assert_eq!(hello["pid"], std::process::id());
    assert_eq!(hello["protocol"], 1);
    drop(c);
    drop(agent);
    assert!(!socket.exists(), "socket removed on stop");
}

#[test]
fn malformed_unknown_and_bad_requests_get_error_replies_and_the_connection_goes_on() {
    let agent = agent("malformed");
    let mut c = Connection::connect(agent.socket()).unwrap();
    let cases = [
        ("this is not json", ErrorKind::Malformed),
        ("[1,2,3]", ErrorKind::Malformed),
        ("{\"v\":1,\"id\":5}", ErrorKind::UnknownRequest),
        (
            "{\"v\":1,\"op\":\"launch_missiles\"}",
            ErrorKind::UnknownRequest,
        ),
        ("{\"v\":2,\"op\":\"hello\"}", ErrorKind::UnsupportedVersion),
        ("{\"op\":\"hello\"}", ErrorKind::UnsupportedVersion),
        ("{\"v\":1,\"op\":\"apply\"}", ErrorKind::BadRequest),
        (
            "{\"v\":1,\"op\":\"apply\",\"path\":7}",
            ErrorKind::BadRequest,
        ),
        (
            "{\"v\":1,\"op\":\"apply\",\"path\":\"relative.so\"}",
            ErrorKind::BadRequest,
        ),
        (
            "{\"v\":1,\"op\":\"apply\",\"path\":\"/etc/hostname\"}",
            ErrorKind::Failed,
        ),
        (
            "{\"v\":1,\"op\":\"switch_set\",\"name\":\"NOPE\",\"value\":\"1\"}",
            ErrorKind::Failed,
        ),
        ("{\"v\":1,\"op\":\"revert\"}", ErrorKind::Failed),
    ];
    for (line, expected) in cases {
        let reply = c.raw(line, T).unwrap();
        assert_eq!(kind(&reply), expected, "{line}: {reply:?}");
    }
    // gc runs reclamation; with no patch applied nothing is resident.
    let reply = c.raw("{\"v\":1,\"op\":\"gc\"}", T).unwrap();
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.result.as_ref().unwrap()["resident"], 0);
    // The id is echoed even on errors.
    let reply = c.raw("{\"v\":1,\"id\":\"x7\",\"op\":\"nope\"}", T).unwrap();
    assert_eq!(reply.id, "x7");
    // Invalid UTF-8.
    let mut raw = UnixStream::connect(agent.socket()).unwrap();
    raw.write_all(b"{\"v\":1,\"op\":\"he\xffllo\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&raw).read_line(&mut line).unwrap();
    assert!(line.contains("\"malformed\""), "{line}");
    // And the first connection still works.
    assert!(c.call(&Request::Status, T).is_ok());
    // Refused changes are journaled.
    let history = c.call(&Request::History, T).unwrap();
    let entries = history["entries"].as_array().unwrap();
    assert!(entries
        .iter()
        .any(|e| e["op"] == "apply" && e["outcome"] == "failed"));
    assert!(entries.iter().any(|e| e["op"] == "gc"));
    assert_eq!(entries[0]["uid"], rustix::process::geteuid().as_raw());
}

#[test]
fn applying_a_fifo_is_refused_at_once_instead_of_hanging_the_request() {
    let agent = agent("fifo");
    let fifo = agent.socket().with_file_name("patch-fifo.so");
    let _ = std::fs::remove_file(&fifo);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        0,
    )
    .unwrap();
    let mut c = Connection::connect(agent.socket()).unwrap();
    // Before: the agent blocked opening the FIFO for reading, and this call failed with the
    // client's timeout ("Resource temporarily unavailable").
    let line = format!(
        "{{\"v\":1,\"op\":\"apply\",\"path\":\"{}\"}}",
        fifo.display()
    );
    let reply = c.raw(&line, T).expect("the agent replies");
    assert_eq!(kind(&reply), ErrorKind::Failed);
    let message = reply.error.as_ref().unwrap().message.clone();
    assert!(
        message.contains("it is a FIFO, not a regular file"),
        "{message}"
    );
    // The agent goes on serving.
    assert!(c.call(&Request::Status, T).is_ok());
    std::fs::remove_file(&fifo).unwrap();
}

#[test]
fn an_oversized_request_is_refused_and_closes_only_its_connection() {
    let agent = agent("oversized");
    let mut raw = UnixStream::connect(agent.socket()).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    let big = vec![b'a'; MAX_LINE + 10];
    // The agent answers after MAX_LINE bytes; the rest of the write may fail.
    let _ = raw.write_all(&big);
    let mut line = String::new();
    BufReader::new(&raw).read_line(&mut line).unwrap();
    assert!(line.contains("\"oversized\""), "{line}");
    let mut c = Connection::connect(agent.socket()).unwrap();
    assert!(c.call(&Request::Hello, T).is_ok());
}

#[test]
fn a_silent_or_vanishing_client_does_not_stop_the_agent() {
    let agent = agent("silent");
    // Many clients that connect and say nothing, and some that vanish mid-line.
    let idle: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(agent.socket()).unwrap())
        .collect();
    for _ in 0..4 {
        let mut s = UnixStream::connect(agent.socket()).unwrap();
        s.write_all(b"{\"v\":1,\"op\":").unwrap();
    }
    let mut c = Connection::connect(agent.socket()).unwrap();
    assert!(c.call(&Request::Functions { symbols: None }, T).is_ok());
    drop(idle);
}

#[test]
fn a_stale_socket_of_our_pid_is_replaced() {
    let dir = std::env::temp_dir().join(format!("evolve-agent-test-{}-stale", std::process::id()));
    let first = evolve_agent::start_in(&dir).unwrap();
    let path = first.socket().to_path_buf();
    // Simulate a crash: the file stays, nobody listens.
    std::mem::forget(first);
    let found = evolve_agent::paths::list_sockets(&dir);
    assert_eq!(found.len(), 1);
    assert!(!found[0].process_gone);
    let second = evolve_agent::start_in(&dir).unwrap();
    assert_eq!(second.socket(), path);
    let mut c = Connection::connect(second.socket()).unwrap();
    assert!(c.call(&Request::Hello, T).is_ok());
}

/// Probed over the socket by the test below.
#[inline(never)]
pub fn agent_probe_target(x: u64, y: u64) -> u64 {
    let mut h = std::hint::black_box(x) ^ 0x9e37_79b9_7f4a_7c15;
    for _ in 0..3 {
        h = h.rotate_left(13).wrapping_mul(std::hint::black_box(y) | 1);
    }
    h
}

fn call_target(x: u64, y: u64) -> u64 {
    std::hint::black_box(agent_probe_target as fn(u64, u64) -> u64)(x, y)
}

#[test]
fn probes_are_added_read_and_removed_over_the_socket_and_journaled() {
    let agent = agent("probes");
    let mut c = Connection::connect(agent.socket()).unwrap();
    let bad = [
        ("{\"v\":1,\"op\":\"probe_add\",\"kind\":\"count\"}", ErrorKind::BadRequest),
        (
            "{\"v\":1,\"op\":\"probe_add\",\"pattern\":\"*::agent_probe_target\",\"kind\":\"hist\"}",
            ErrorKind::BadRequest,
        ),
        (
            "{\"v\":1,\"op\":\"probe_add\",\"pattern\":\"*::agent_probe_target\",\"kind\":\"when\",\"expr\":\"arg0 => 3\"}",
            ErrorKind::BadRequest,
        ),
        (
            "{\"v\":1,\"op\":\"probe_add\",\"pattern\":\"*::agent_probe_target\",\"kind\":\"sample\"}",
            ErrorKind::BadRequest,
        ),
        (
            "{\"v\":1,\"op\":\"probe_add\",\"pattern\":\"no_such_function_anywhere\",\"kind\":\"count\"}",
            ErrorKind::Failed,
        ),
        ("{\"v\":1,\"op\":\"probe_rm\"}", ErrorKind::BadRequest),
        ("{\"v\":1,\"op\":\"probe_rm\",\"probe\":1,\"all\":true}", ErrorKind::BadRequest),
        ("{\"v\":1,\"op\":\"probe_rm\",\"probe\":999999}", ErrorKind::Failed),
        ("{\"v\":1,\"op\":\"probe_read\",\"probe\":\"one\"}", ErrorKind::BadRequest),
        ("{\"v\":1,\"op\":\"probe_read\",\"probe\":999999}", ErrorKind::Failed),
    ];
    for (line, expected) in bad {
        let reply = c.raw(line, T).unwrap();
        assert_eq!(kind(&reply), expected, "{line}: {reply:?}");
    }
    let no_match = c.raw(bad[4].0, T).unwrap();
    assert!(
        no_match
            .error
            .unwrap()
            .message
            .contains("no_such_function_anywhere"),
        "the error names the pattern"
    );

    let added = c
        .call(
            &Request::ProbeAdd {
                pattern: "*::agent_probe_target".into(),
                kind: ProbeKindName::When,
                arg: None,
                expr: Some("arg1 >= 7".into()),
            },
            T,
        )
        .unwrap();
    let id = added["probes"][0]["id"].as_u64().unwrap();
    assert_eq!(added["probes"][0]["kind"], "when arg1 >= 7");
    assert_eq!(added["probes"][0]["pattern"], "*::agent_probe_target");
    for y in 0..10 {
        call_target(1, y);
    }
    let read = c.call(&Request::ProbeRead { probe: Some(id) }, T).unwrap();
    let r = &read["readings"][0];
    assert_eq!(r["calls"], 10);
    assert_eq!(r["hits"], 3, "y = 7, 8, 9: {r}");
    assert!(!r["backtraces"][0].as_str().unwrap().is_empty());
    let list = c.call(&Request::ProbeList, T).unwrap();
    assert_eq!(list["probes"].as_array().unwrap().len(), 1);
    let removed = c
        .call(
            &Request::ProbeRm {
                probe: None,
                pattern: Some("*::agent_probe_target".into()),
                all: false,
            },
            T,
        )
        .unwrap();
    assert_eq!(removed["probes"][0]["id"], id);
    let list = c.call(&Request::ProbeList, T).unwrap();
    assert!(list["probes"].as_array().unwrap().is_empty());

    let history = c.call(&Request::History, T).unwrap();
    let ops: Vec<(&str, &str)> = history["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["op"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        // The other tests of this file share the agent and journal their own requests.
        .filter(|(op, _)| op.starts_with("probe_"))
        .collect();
    assert_eq!(
        ops,
        [
            // Requests that parse are journaled, refused ones too.
            ("probe_add", "failed"),
            ("probe_add", "failed"),
            ("probe_add", "failed"),
            ("probe_rm", "failed"),
            ("probe_rm", "failed"),
            ("probe_rm", "failed"),
            ("probe_add", "failed"),
            ("probe_add", "ok"),
            ("probe_rm", "ok"),
        ]
    );
}
