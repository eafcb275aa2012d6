#[evolve::switch]
static mut MUTABLE: bool = false;

#[evolve::switch(in 3..=1)]
static EMPTY_RANGE: u8 = 3;

#[evolve::switch(in 0..=1000)]
static HUGE_RANGE: u16 = 0;

#[evolve::switch(in 0..)]
static OPEN_RANGE: u8 = 0;

#[evolve::switch(in LEVELS)]
static NOT_A_DOMAIN: u8 = 0;

#[derive(Clone, Copy, evolve::SwitchValue)]
enum WithFields {
    A(u8),
}

#[derive(Clone, Copy, evolve::SwitchValue)]
enum Empty {}

fn main() {}
