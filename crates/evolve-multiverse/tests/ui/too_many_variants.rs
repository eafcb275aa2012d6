// 4 × 4 × 4 = 64 variants are allowed; a fourth switch makes 256.
#[evolve::switch(in 0..=3)]
static A: u8 = 0;
#[evolve::switch(in 0..=3)]
static B: u8 = 0;
#[evolve::switch(in 0..=3)]
static C: u8 = 0;
#[evolve::switch(in 0..=3)]
static D: u8 = 0;

#[evolve::multiverse(A, B, C)]
fn at_the_limit() -> u8 {
    A.get() + B.get() + C.get()
}

#[evolve::multiverse(A, B, C, D)]
fn over_the_limit() -> u8 {
    A.get() + B.get() + C.get() + D.get()
}

fn main() {
    at_the_limit();
    over_the_limit();
}
