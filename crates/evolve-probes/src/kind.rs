//! What a probe records, and its textual form (`count`, `latency`, `hist:arg1`,
//! `pred:arg0==0`, `coverage`) for command lines.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A comparison in a predicate probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cmp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<` (unsigned)
    Lt,
    /// `>` (unsigned)
    Gt,
}

impl Cmp {
    /// Whether `a <op> b` holds.
    pub fn holds(self, a: u64, b: u64) -> bool {
        match self {
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
            Cmp::Lt => a < b,
            Cmp::Gt => a > b,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Cmp::Eq => "==",
            Cmp::Ne => "!=",
            Cmp::Lt => "<",
            Cmp::Gt => ">",
        }
    }
}

/// What a probe records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeKind {
    /// Calls since the probe was added.
    Count,
    /// Time from entry to exit.
    Latency,
    /// Log2 histogram of integer argument `arg` (0-based: `rdi`, `rsi`, …).
    Histogram {
        /// Which argument.
        arg: usize,
    },
    /// Counts calls where `arg <cmp> value`, capturing the first backtraces; never stops.
    Predicate {
        /// Which argument.
        arg: usize,
        /// The comparison.
        cmp: Cmp,
        /// The value compared against.
        value: u64,
    },
    /// Whether the function ran; the probe removes itself after the first hit.
    Coverage,
}

impl ProbeKind {
    /// Whether the kind needs the entry hook (everything but counting).
    pub(crate) fn needs_hook(self) -> bool {
        !matches!(self, ProbeKind::Count)
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeKind::Count => write!(f, "count"),
            ProbeKind::Latency => write!(f, "latency"),
            ProbeKind::Histogram { arg } => write!(f, "hist:arg{arg}"),
            ProbeKind::Predicate { arg, cmp, value } => {
                write!(f, "pred:arg{arg}{}{value}", cmp.symbol())
            }
            ProbeKind::Coverage => write!(f, "coverage"),
        }
    }
}

fn parse_arg(s: &str) -> Option<usize> {
    s.trim()
        .strip_prefix("arg")?
        .parse()
        .ok()
        .filter(|&a| a < 6)
}

impl FromStr for ProbeKind {
    type Err = String;

    /// Parses `count`, `latency`, `hist:argN`, `pred:argN==V` (also `!=`, `<`, `>`), `coverage`.
    fn from_str(s: &str) -> Result<ProbeKind, String> {
        let bad = || {
            format!("unknown probe kind `{s}` (count, latency, hist:argN, pred:argN==V, coverage)")
        };
        Ok(match s {
            "count" => ProbeKind::Count,
            "latency" => ProbeKind::Latency,
            "coverage" => ProbeKind::Coverage,
            _ if s.starts_with("hist:") => ProbeKind::Histogram {
                arg: parse_arg(&s[5..]).ok_or_else(bad)?,
            },
            _ if s.starts_with("pred:") => {
                let body = &s[5..];
                let (cmp, at, len) = [
                    ("==", Cmp::Eq),
                    ("!=", Cmp::Ne),
                    ("<", Cmp::Lt),
                    (">", Cmp::Gt),
                ]
                .iter()
                .find_map(|(sym, c)| body.find(sym).map(|i| (*c, i, sym.len())))
                .ok_or_else(bad)?;
                let value = body[at + len..].trim();
                let value = match value.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => value.parse(),
                }
                .map_err(|_| bad())?;
                ProbeKind::Predicate {
                    arg: parse_arg(&body[..at]).ok_or_else(bad)?,
                    cmp,
                    value,
                }
            }
            _ => return Err(bad()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_text() {
        for s in [
            "count",
            "latency",
            "hist:arg1",
            "pred:arg0==0",
            "pred:arg2>7",
            "coverage",
        ] {
            assert_eq!(s.parse::<ProbeKind>().unwrap().to_string(), s);
        }
        assert!("hist:arg9".parse::<ProbeKind>().is_err());
    }
}
