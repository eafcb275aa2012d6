//! Switches: configuration statics whose values form a small, declared domain.
//!
//! A switch is read and written like an ordinary value, through an atomic, so changing it is
//! always safe; what multiverse adds is that [`crate::commit`] specialises the code that reads
//! it for its current value.

use std::sync::atomic::{AtomicU64, Ordering};

/// A type a switch can hold: `bool`, an integer, or a fieldless enum deriving
/// `SwitchValue` (whose variants form the domain).
///
/// Values are stored as their raw `u64` form, `value as u64` (sign-extended for signed
/// integers, the discriminant for enums).
pub trait SwitchValue: Copy + Send + Sync + 'static {
    /// The domain implied by the type (`bool`: false, true; an enum: its variants), or `None`
    /// for integers, whose switches must declare one.
    const DOMAIN: Option<&'static [u64]>;
    /// The raw form.
    fn to_raw(self) -> u64;
    /// The value of a raw form produced by [`SwitchValue::to_raw`] or `value as u64`.
    fn from_raw(raw: u64) -> Self;
}

impl SwitchValue for bool {
    const DOMAIN: Option<&'static [u64]> = Some(&[0, 1]);
    #[inline(always)]
    fn to_raw(self) -> u64 {
        self as u64
    }
    #[inline(always)]
    fn from_raw(raw: u64) -> bool {
        raw != 0
    }
}

macro_rules! integer_switch_value {
    ($($t:ty),*) => {$(
        impl SwitchValue for $t {
            const DOMAIN: Option<&'static [u64]> = None;
            #[inline(always)]
            fn to_raw(self) -> u64 { self as u64 }
            #[inline(always)]
            fn from_raw(raw: u64) -> $t { raw as $t }
        }
    )*};
}
integer_switch_value!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

/// A configuration switch holding a `T`; declare it with `#[evolve::switch]`.
///
/// # Example
///
/// ```
/// #[evolve::switch]
/// static VERBOSE: bool = false;
///
/// #[evolve::switch(in 0..=3)]
/// static LEVEL: u8 = 1;
///
/// assert!(!VERBOSE.get());
/// VERBOSE.set(true);
/// LEVEL.set(3);
/// assert_eq!((VERBOSE.get(), LEVEL.get()), (true, 3));
/// assert_eq!(LEVEL.domain(), &[0, 1, 2, 3]);
/// ```
#[derive(Debug)]
pub struct Switch<T: SwitchValue> {
    raw: AtomicU64,
    name: &'static str,
    domain: &'static [u64],
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T: SwitchValue> Switch<T> {
    /// A switch (used by `#[evolve::switch]`): `initial` and `domain` in raw form.
    #[doc(hidden)]
    pub const fn new(name: &'static str, initial: u64, domain: &'static [u64]) -> Switch<T> {
        Switch {
            raw: AtomicU64::new(initial),
            name,
            domain,
            _type: std::marker::PhantomData,
        }
    }

    /// The current value.
    #[inline(always)]
    pub fn get(&self) -> T {
        T::from_raw(self.raw.load(Ordering::Relaxed))
    }

    /// Changes the value. Code already committed keeps its binding until the next commit; a
    /// value outside the domain is allowed (commit then uses the generic code).
    #[inline]
    pub fn set(&self, value: T) {
        self.raw.store(value.to_raw(), Ordering::Relaxed);
    }

    /// The switch's name as declared.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The declared domain, in raw form (`value as u64`).
    pub fn domain(&self) -> &'static [u64] {
        self.domain
    }
}

/// A switch of any type, as the registry sees it.
pub trait AnySwitch: Sync {
    /// The switch's name.
    fn name(&self) -> &'static str;
    /// The current value in raw form.
    fn raw(&self) -> u64;
    /// The switch's identity (its address).
    fn id(&self) -> usize;
    /// The declared domain, in raw form.
    fn domain(&self) -> &'static [u64];
    /// Changes the value, in raw form (as [`Switch::set`]; code keeps its binding until the
    /// next commit).
    fn set_raw(&self, raw: u64);
}

impl<T: SwitchValue> AnySwitch for Switch<T> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn raw(&self) -> u64 {
        self.raw.load(Ordering::Relaxed)
    }
    fn id(&self) -> usize {
        self as *const Switch<T> as usize
    }
    fn domain(&self) -> &'static [u64] {
        self.domain
    }
    fn set_raw(&self, raw: u64) {
        self.raw.store(raw, Ordering::Relaxed);
    }
}

/// Every switch of the program (each `#[evolve::switch]` adds one; nothing runs at start-up).
#[linkme::distributed_slice]
pub static SWITCHES: [&'static dyn AnySwitch];

/// The switch whose identity ([`AnySwitch::id`]: its address) is `id`, if any: how a C program
/// names a switch (`&variable`).
pub fn switch_with_id(id: usize) -> Option<&'static dyn AnySwitch> {
    switches().into_iter().find(|s| s.id() == id)
}

/// Every switch of the program, in link order, then those registered at run time (for control
/// tools: `evolve switch`).
pub fn switches() -> Vec<&'static dyn AnySwitch> {
    SWITCHES
        .iter()
        .copied()
        .chain(crate::foreign::switches())
        .collect()
}

/// The switch declared with `name`, if there is exactly one.
pub fn switch_named(name: &str) -> Option<&'static dyn AnySwitch> {
    let all = switches();
    let mut found = all.into_iter().filter(|s| s.name() == name);
    match (found.next(), found.next()) {
        (Some(s), None) => Some(s),
        _ => None,
    }
}
