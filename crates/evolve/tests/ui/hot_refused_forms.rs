#[evolve::hot]
pub const fn limit() -> u64 {
    1
}

#[evolve::hot]
pub fn largest<T: Ord + Copy>(items: &[T]) -> Option<T> {
    items.iter().copied().max()
}

pub struct Meter;

#[evolve::hot]
impl Clone for Meter {
    fn clone(&self) -> Meter {
        Meter
    }
}

fn main() {}
