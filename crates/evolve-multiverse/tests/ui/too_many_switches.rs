#[evolve::switch]
static S1: bool = false;
#[evolve::switch]
static S2: bool = false;
#[evolve::switch]
static S3: bool = false;
#[evolve::switch]
static S4: bool = false;
#[evolve::switch]
static S5: bool = false;
#[evolve::switch]
static S6: bool = false;
#[evolve::switch]
static S7: bool = false;

#[evolve::multiverse(S1, S2, S3, S4, S5, S6, S7)]
fn seven() {}

fn main() {}
