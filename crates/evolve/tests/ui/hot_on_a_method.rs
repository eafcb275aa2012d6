pub struct Meter {
    total: u64,
}

impl Meter {
    #[evolve::hot]
    pub fn bump(&mut self, by: u64) -> u64 {
        self.total += by;
        self.total
    }
}

fn main() {}
