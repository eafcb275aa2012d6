//! The http example (Tokio + axum) patched live with a thousand requests in flight: each request
//! finishes on the version of the handler and middleware it started on (the response says
//! which), requests made after the patch use the new version, none fails; the revert brings the
//! old version back.

use evolve_demo::http::{parse_response, request, request_text, Response};
use evolve_demo::server::Server;
use evolve_demo::workspace::{ExampleWorkspace, Flavor, HTTP};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// Requests in flight when the patch lands (and as many started after it).
const IN_FLIGHT: u64 = 1000;

/// Starts `count` slow requests with ids from `first`; each resolves to its response.
fn start_slow(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    first: u64,
    count: u64,
) -> Vec<JoinHandle<Result<Response, String>>> {
    (first..first + count)
        .map(|id| {
            runtime.spawn(async move {
                let fail = |e: std::io::Error| format!("slow {id}: {e}");
                let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(fail)?;
                let text = request_text("GET", &format!("/slow/{id}"), addr);
                stream.write_all(text.as_bytes()).await.map_err(fail)?;
                let mut raw = Vec::new();
                stream.read_to_end(&mut raw).await.map_err(fail)?;
                parse_response(&raw).map_err(|e| format!("slow {id}: {e}"))
            })
        })
        .collect()
}

/// Waits until the service counts `count` slow requests parked at its gate.
fn wait_parked(addr: SocketAddr, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stats = request(addr, "GET", "/stats").unwrap().body;
        let parked: u64 = stats
            .split_whitespace()
            .skip_while(|w| *w != "waiting")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no waiting count in {stats:?}"));
        if parked == count {
            return;
        }
        assert!(
            parked < count && Instant::now() < deadline,
            "{parked} of {count} requests parked: {stats}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn body(addr: SocketAddr, path: &str) -> String {
    let response = request(addr, "GET", path).unwrap();
    assert_eq!(response.status, 200, "{path}: {response:?}");
    response.body
}

#[test]
fn requests_in_flight_finish_on_their_version_while_new_ones_use_the_patch() {
    let workspace = ExampleWorkspace::prepare_example(&HTTP, "http-test").unwrap();
    let binary = workspace.build(Flavor::Evolve).unwrap();
    let sockets = workspace.dir.join("sockets");
    let server = Server::start_example(&HTTP, &binary, Some(&sockets), &[]).unwrap();
    let addr = server.addr;
    assert_eq!(body(addr, "/hello"), "hello v1\n");

    // The fix: new bodies for the slow handler, the quick one and the middleware.
    let file = "http-handlers/src/lib.rs";
    workspace
        .edit(
            file,
            "format!(\"slow {id} v1\\n\")",
            "format!(\"slow {id} v2\\n\")",
        )
        .unwrap();
    workspace
        .edit(file, "\"hello v1\\n\"", "\"hello v2\\n\"")
        .unwrap();
    workspace
        .edit(file, "\"track v1\"", "\"track v2\"")
        .unwrap();
    let patch = workspace.build_patch(server.pid, "fix").unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let before = start_slow(&runtime, addr, 0, IN_FLIGHT);
    wait_parked(addr, IN_FLIGHT);
    let mut control = server.control().unwrap();
    let applied = control.apply(&patch).unwrap();
    assert_eq!(body(addr, "/hello"), "hello v2\n", "{applied}");
    let after = start_slow(&runtime, addr, IN_FLIGHT, IN_FLIGHT);
    wait_parked(addr, 2 * IN_FLIGHT);
    request(addr, "POST", "/release").unwrap();

    let mut failures = Vec::new();
    for (id, handle) in before.into_iter().chain(after).enumerate() {
        let version = if (id as u64) < IN_FLIGHT { 1 } else { 2 };
        match runtime.block_on(handle).unwrap() {
            Ok(response)
                if response.status == 200
                    && response.body == format!("slow {id} v{version}\n")
                    && response.header("x-served-by") == Some(&format!("track v{version}")) => {}
            Ok(response) => failures.push(format!("request {id}: {response:?}")),
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests wrong, e.g. {:?}",
        failures.len(),
        2 * IN_FLIGHT,
        &failures[..failures.len().min(5)]
    );

    control.revert(None).unwrap();
    assert_eq!(body(addr, "/hello"), "hello v1\n");
    let again = start_slow(&runtime, addr, 0, 1);
    wait_parked(addr, 1);
    request(addr, "POST", "/release").unwrap();
    let response = runtime
        .block_on(again.into_iter().next().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(response.body, "slow 0 v1\n");
    assert_eq!(response.header("x-served-by"), Some("track v1"));
}
