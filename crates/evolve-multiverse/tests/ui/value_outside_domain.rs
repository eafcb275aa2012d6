#[evolve::switch(in 0..=3)]
static LEVEL: u8 = 0;

#[evolve::multiverse(LEVEL = [1, 7])]
fn logs() -> u8 {
    LEVEL.get()
}

fn main() {
    logs();
}
