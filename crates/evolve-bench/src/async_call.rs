//! `async-call-overhead`: the cost per call of a `#[evolve::hot] async fn` against the same
//! plain `async fn`, both awaited to completion through one suspension (a future that is
//! pending once, as a handler waiting for I/O is), on a minimal executor loop. The hot one goes
//! through its stub and returns its future boxed — one allocation per call, which is what lets a
//! future in flight finish on the version it started with. Medians of repeated samples, the two
//! variants interleaved within every round.

use crate::stats::{median, round3};
use serde_json::{json, Value};
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// Arguments of the scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Calls per sample.
    #[arg(long, default_value_t = 2_000_000)]
    pub iters: u64,
    /// Samples per variant (the median is reported).
    #[arg(long, default_value_t = 9)]
    pub runs: usize,
    /// Accepted for uniformity: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

/// Pending on its first poll, ready on the second.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if std::mem::replace(&mut self.0, true) {
            Poll::Ready(())
        } else {
            context.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// The handler, plain.
#[inline(never)]
pub async fn plain(x: u64) -> u64 {
    YieldOnce(false).await;
    x.wrapping_mul(3).wrapping_add(1)
}

/// The same handler, hot.
#[evolve::hot]
pub async fn hot(x: u64) -> u64 {
    YieldOnce(false).await;
    x.wrapping_mul(3).wrapping_add(1)
}

/// Polls `future` to its end.
fn run_to_end<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(value) = future.as_mut().poll(&mut context) {
            return value;
        }
    }
}

#[inline(never)]
fn loop_plain(n: u64) -> u64 {
    (0..n).fold(0u64, |acc, i| {
        acc.wrapping_add(run_to_end(plain(black_box(i))))
    })
}

#[inline(never)]
fn loop_hot(n: u64) -> u64 {
    (0..n).fold(0u64, |acc, i| {
        acc.wrapping_add(run_to_end(hot(black_box(i))))
    })
}

fn ns_per_call(f: fn(u64) -> u64, iters: u64) -> f64 {
    let start = Instant::now();
    black_box(f(iters));
    start.elapsed().as_secs_f64() * 1e9 / iters as f64
}

/// Runs the scenario and returns its JSON record.
pub fn run(args: &Args) -> Result<Value, String> {
    let loops = [loop_plain, loop_hot];
    for f in loops {
        black_box(f(args.iters / 10 + 1));
    }
    let mut samples = [Vec::new(), Vec::new()];
    for round in 0..args.runs.max(1) {
        for k in 0..2 {
            let v = (round + k) % 2;
            samples[v].push(ns_per_call(loops[v], args.iters));
        }
    }
    let [plain_ns, hot_ns] = samples.map(|mut s| median(&mut s));
    Ok(json!({
        "scenario": "async-call-overhead",
        "iters_per_sample": args.iters,
        "runs": args.runs.max(1),
        "plain_async_ns": round3(plain_ns),
        "hot_async_ns": round3(hot_ns),
        "ratio": round3(hot_ns / plain_ns),
        "extra_ns_per_call": round3(hot_ns - plain_ns),
        "what": "a call awaited through one suspension; hot: stub jmp + the future boxed",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_variants_compute_the_same_and_the_record_is_consistent() {
        assert_eq!(loop_plain(1000), loop_hot(1000));
        let r = run(&Args {
            iters: 1000,
            runs: 3,
            json: true,
        })
        .unwrap();
        let (plain, hot) = (
            r["plain_async_ns"].as_f64().unwrap(),
            r["hot_async_ns"].as_f64().unwrap(),
        );
        assert!(plain > 0.0 && hot > 0.0);
        assert!((r["ratio"].as_f64().unwrap() - hot / plain).abs() < 0.01 * (hot / plain) + 0.002);
    }
}
