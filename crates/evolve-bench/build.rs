//! The bench is an Evolve host: its hot functions (call-overhead, apply-latency) need the
//! program's symbols exported so patches can bind to them.
fn main() {
    evolve_build::host();
}
