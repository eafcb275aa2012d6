#[evolve::switch]
static FLAG: bool = false;

#[evolve::multiverse()]
fn no_switches() {}

#[evolve::multiverse(FLAG)]
fn generic<T: Copy>(x: T) -> T {
    x
}

#[evolve::multiverse(FLAG)]
async fn asynchronous() {}

#[evolve::multiverse(FLAG)]
unsafe fn not_safe() {}

#[evolve::multiverse(FLAG = true)]
fn values_not_a_list() {}

fn main() {}
