#[evolve::switch]
static LEVEL: u8 = 0;

fn main() {
    LEVEL.get();
}
