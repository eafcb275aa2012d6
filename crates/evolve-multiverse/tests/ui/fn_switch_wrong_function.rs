fn takes_bytes(_: &[u8]) -> u64 {
    0
}
fn takes_a_number(_: u64) -> u64 {
    0
}

#[evolve::switch(in [takes_bytes, takes_a_number])]
static HASH: fn(&[u8]) -> u64 = takes_bytes;

fn main() {
    HASH.set(takes_a_number);
}
