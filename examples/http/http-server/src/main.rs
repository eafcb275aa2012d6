//! `http-server [--port PORT] [--bind ADDR]`: an async HTTP service on Tokio and axum whose
//! handlers (`http-handlers`) are hot async functions, with the Evolve agent started so that
//! `evolve apply PID patch.so` reaches it.
//!
//! It prints one line when ready — `http-server listening on ADDR pid PID` — and runs until
//! `POST /shutdown`.

use std::io::Write;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut bind, mut port) = ("127.0.0.1".to_string(), "8080".to_string());
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--port", Some(value)) => port = value,
            ("--bind", Some(value)) => bind = value,
            _ => {
                eprintln!("usage: http-server [--port PORT] [--bind ADDR]");
                std::process::exit(2);
            }
        }
    }
    let listener = tokio::net::TcpListener::bind(format!("{bind}:{port}"))
        .await
        .unwrap_or_else(|e| {
            eprintln!("http-server: cannot listen on {bind}:{port}: {e}");
            std::process::exit(1);
        });
    // Dropped (its socket removed) when the service ends.
    let _agent = evolve::agent::start().unwrap_or_else(|e| {
        eprintln!("http-server: the evolve agent did not start: {e}");
        std::process::exit(1);
    });
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    println!("http-server listening on {addr} pid {}", std::process::id());
    let _ = std::io::stdout().flush();
    let app = http_handlers::App::new();
    let router = http_handlers::router(app.clone());
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(async move { app.shutdown_requested().await })
        .await
    {
        eprintln!("http-server: {e}");
        std::process::exit(1);
    }
}
