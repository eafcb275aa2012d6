// A state transfer writes the new value over the static in place: a static without interior
// mutability (here a plain integer, which the compiler may keep in read-only memory) must be
// refused at compile time.
pub static LIMIT: u64 = 10;

#[evolve::transfer(LIMIT)]
fn limit_from_v1(old: &u32) -> u64 {
    *old as u64
}

fn main() {}
