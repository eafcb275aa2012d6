#[evolve::hot(fast)]
pub fn price(quantity: u64) -> u64 {
    quantity * 10
}

fn main() {}
