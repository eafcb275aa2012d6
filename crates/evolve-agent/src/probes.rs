//! Serving the probe requests (`probe_add`, `probe_list`, `probe_rm`, `probe_read`) over the
//! probes library's public API ([`evolve_probes`]).
//!
//! The agent remembers, per probe it added, the pattern and the kind as the client asked for it
//! (the library knows only functions and its own kinds: `when arg1 <= 100` becomes the library
//! predicate `arg1 < 101`), and when it was added, so `list` shows what was asked and `rm` can
//! remove by pattern.

use crate::journal::now_ms;
use crate::protocol::{
    CmpOp, ErrorKind, LatencyFigures, ProbeEntry, ProbeKindName, ProbeList, ProbeReadings,
    ProbeReport, WhenExpr,
};
use evolve_probes::{Cmp, ProbeId, ProbeKind};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

type Outcome<T> = Result<T, (ErrorKind, String)>;

fn bad(message: impl Into<String>) -> (ErrorKind, String) {
    (ErrorKind::BadRequest, message.into())
}

fn failed(e: impl std::fmt::Display) -> (ErrorKind, String) {
    (ErrorKind::Failed, e.to_string())
}

/// What the agent knows about a probe it added.
struct Meta {
    pattern: String,
    kind: String,
    added_at_ms: u64,
}

/// The agent's record of the probes it added.
#[derive(Default)]
pub struct Probes {
    meta: Mutex<HashMap<u64, Meta>>,
}

/// The library kind for a `when` expression (the library compares with `==`, `!=`, `<`, `>`).
fn predicate(e: WhenExpr) -> ProbeKind {
    let (cmp, value) = match e.op {
        CmpOp::Eq => (Cmp::Eq, e.value),
        CmpOp::Ne => (Cmp::Ne, e.value),
        CmpOp::Lt => (Cmp::Lt, e.value),
        CmpOp::Gt => (Cmp::Gt, e.value),
        // `WhenExpr` refuses the predicates that always hold, so these do not overflow.
        CmpOp::Le => (Cmp::Lt, e.value + 1),
        CmpOp::Ge => (Cmp::Gt, e.value - 1),
    };
    ProbeKind::Predicate {
        arg: e.arg,
        cmp,
        value,
    }
}

/// Checks a `probe_add`'s arguments: the library kind and its text as the client sees it.
pub fn kind_of(
    kind: ProbeKindName,
    arg: Option<usize>,
    expr: Option<&str>,
) -> Outcome<(ProbeKind, String)> {
    let unexpected = |what: &str, name: &str| {
        bad(format!(
            "`{what}` does not apply to a {name} probe (only `arg` for hist, `expr` for when)"
        ))
    };
    let name = match kind {
        ProbeKindName::Count => "count",
        ProbeKindName::Latency => "latency",
        ProbeKindName::Hist => "hist",
        ProbeKindName::When => "when",
        ProbeKindName::Coverage => "coverage",
    };
    if arg.is_some() && kind != ProbeKindName::Hist {
        return Err(unexpected("arg", name));
    }
    if expr.is_some() && kind != ProbeKindName::When {
        return Err(unexpected("expr", name));
    }
    Ok(match kind {
        ProbeKindName::Count => (ProbeKind::Count, "count".into()),
        ProbeKindName::Latency => (ProbeKind::Latency, "latency".into()),
        ProbeKindName::Coverage => (ProbeKind::Coverage, "coverage".into()),
        ProbeKindName::Hist => {
            let arg = arg.ok_or_else(|| bad("a hist probe needs `arg` (0-5)"))?;
            if arg > 5 {
                return Err(bad(format!(
                    "hist argument {arg}: arguments 0-5 (rdi, rsi, rdx, rcx, r8, r9) can be read"
                )));
            }
            (ProbeKind::Histogram { arg }, format!("hist arg{arg}"))
        }
        ProbeKindName::When => {
            let text = expr.ok_or_else(|| bad("a when probe needs `expr`, e.g. \"arg0 == 0\""))?;
            let e: WhenExpr = text.parse().map_err(bad)?;
            (predicate(e), format!("when {e}"))
        }
    })
}

/// Whether `name` matches the glob `pattern` (`*`: any run of characters, `?`: one): the
/// probes library's own matching, so `rm PATTERN` selects what `add PATTERN` attached.
pub use evolve_probes::glob_matches;

impl Probes {
    fn meta(&self) -> MutexGuard<'_, HashMap<u64, Meta>> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(meta: &HashMap<u64, Meta>, info: &evolve_probes::ProbeInfo) -> ProbeEntry {
        let m = meta.get(&info.id.0);
        ProbeEntry {
            id: info.id.0,
            pattern: m.map(|m| m.pattern.clone()),
            function: info.function.clone(),
            address: info.address,
            kind: m.map_or_else(|| info.kind.clone(), |m| m.kind.clone()),
            attached: info.attached,
            added_at_ms: m.map(|m| m.added_at_ms),
        }
    }

    fn entries(meta: &HashMap<u64, Meta>) -> Vec<ProbeEntry> {
        evolve_probes::list()
            .iter()
            .map(|i| Self::entry(meta, i))
            .collect()
    }

    /// `probe_add`.
    pub fn add(
        &self,
        pattern: &str,
        kind: ProbeKindName,
        arg: Option<usize>,
        expr: Option<&str>,
    ) -> Outcome<ProbeList> {
        let (kind, shown) = kind_of(kind, arg, expr)?;
        if pattern.trim().is_empty() {
            return Err(bad("an empty pattern"));
        }
        let mut meta = self.meta();
        let ids = evolve_probes::add(pattern, kind).map_err(failed)?;
        let at = now_ms();
        for id in &ids {
            meta.insert(
                id.0,
                Meta {
                    pattern: pattern.to_string(),
                    kind: shown.clone(),
                    added_at_ms: at,
                },
            );
        }
        let probes = Self::entries(&meta)
            .into_iter()
            .filter(|e| ids.contains(&ProbeId(e.id)))
            .collect();
        Ok(ProbeList { probes })
    }

    /// `probe_list`.
    pub fn list(&self) -> ProbeList {
        ProbeList {
            probes: Self::entries(&self.meta()),
        }
    }

    /// `probe_rm`.
    pub fn remove(&self, id: Option<u64>, pattern: Option<&str>, all: bool) -> Outcome<ProbeList> {
        let mut meta = self.meta();
        let present = Self::entries(&meta);
        let chosen: Vec<ProbeEntry> = match (id, pattern, all) {
            (Some(id), None, false) => {
                let found: Vec<ProbeEntry> = present.into_iter().filter(|e| e.id == id).collect();
                if found.is_empty() {
                    return Err(failed(evolve_probes::Error::UnknownProbe(ProbeId(id))));
                }
                found
            }
            (None, Some(pattern), false) => {
                let found: Vec<ProbeEntry> = present
                    .iter()
                    .filter(|e| {
                        e.pattern.as_deref() == Some(pattern) || glob_matches(pattern, &e.function)
                    })
                    .cloned()
                    .collect();
                if found.is_empty() {
                    let ids: Vec<String> = present
                        .iter()
                        .map(|e| format!("{} {}", e.id, e.function))
                        .collect();
                    return Err(failed(format!(
                        "no probe matches `{pattern}` (probes: {})",
                        if ids.is_empty() {
                            "none".to_string()
                        } else {
                            ids.join(", ")
                        }
                    )));
                }
                found
            }
            (None, None, true) => present,
            _ => {
                return Err(bad(
                    "probe_rm takes exactly one of `probe` (an id), `pattern`, `all: true`",
                ))
            }
        };
        let mut first_error = None;
        let mut removed = Vec::new();
        if all {
            if let Err(e) = evolve_probes::remove_all() {
                first_error = Some(failed(e));
            }
            meta.clear();
            removed = chosen;
        } else {
            for e in chosen {
                match evolve_probes::remove(ProbeId(e.id)) {
                    Ok(()) => {
                        meta.remove(&e.id);
                        removed.push(e);
                    }
                    Err(err) => {
                        first_error.get_or_insert_with(|| failed(format!("probe {}: {err}", e.id)));
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(ProbeList { probes: removed }),
        }
    }

    /// `probe_read`.
    pub fn read(&self, id: Option<u64>) -> Outcome<ProbeReadings> {
        let meta = self.meta();
        let infos: Vec<evolve_probes::ProbeInfo> = match id {
            Some(id) => {
                let found: Vec<_> = evolve_probes::list()
                    .into_iter()
                    .filter(|i| i.id.0 == id)
                    .collect();
                if found.is_empty() {
                    return Err(failed(evolve_probes::Error::UnknownProbe(ProbeId(id))));
                }
                found
            }
            None => evolve_probes::list(),
        };
        let at_ms = now_ms();
        let mut readings = Vec::new();
        for info in infos {
            // A probe removed since the list was taken is skipped (or, asked for by id, an
            // error).
            let r = match evolve_probes::read(info.id) {
                Ok(r) => r,
                Err(e) if id.is_some() => return Err(failed(e)),
                Err(_) => continue,
            };
            readings.push(ProbeReport {
                probe: Self::entry(&meta, &info),
                calls: r.calls,
                latency: r.latency.map(|l| {
                    let p50_ns = percentile(&l.histogram_ns, 0.50, l.max_ns);
                    let p99_ns = percentile(&l.histogram_ns, 0.99, l.max_ns);
                    LatencyFigures {
                        count: l.count,
                        unwound: l.unwound,
                        mean_ns: l.mean_ns,
                        p50_ns,
                        p99_ns,
                        max_ns: l.max_ns,
                        histogram_ns: l.histogram_ns,
                    }
                }),
                histogram: r.histogram,
                hits: r.hits,
                backtraces: r.backtraces,
                covered: r.covered,
            });
        }
        Ok(ProbeReadings { at_ms, readings })
    }

    /// Calls per function, from the attached count probes (none if there are none).
    pub fn call_counts(&self) -> Option<Vec<(String, u64)>> {
        let counts: Vec<(String, u64)> = evolve_probes::list()
            .into_iter()
            .filter(|i| i.attached && i.kind == "count")
            .filter_map(|i| evolve_probes::read(i.id).ok())
            .map(|r| (r.function, r.calls))
            .collect();
        (!counts.is_empty()).then_some(counts)
    }
}

/// The `q` quantile of a log2 histogram `(lower bound, count)`: the upper bound of the bucket
/// holding it, at most `max`.
fn percentile(histogram: &[(u64, u64)], q: f64, max: f64) -> f64 {
    let total: u64 = histogram.iter().map(|b| b.1).sum();
    if total == 0 {
        return 0.0;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for &(low, count) in histogram {
        seen += count;
        if seen >= rank {
            let upper = if low == 0 { 1.0 } else { low as f64 * 2.0 };
            return upper.min(max);
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_matches("ctlhost::*", "ctlhost::tally"));
        assert!(glob_matches("*::tally", "ctlhost::tally"));
        assert!(glob_matches("ctl?ost::t*y", "ctlhost::tally"));
        assert!(glob_matches("ctlhost::tally", "ctlhost::tally"));
        assert!(!glob_matches("ctlhost::tal", "ctlhost::tally"));
        assert!(!glob_matches("*::price", "ctlhost::tally"));
        assert!(glob_matches("*", ""));
    }

    #[test]
    fn when_maps_onto_the_library_comparisons() {
        let kind = |t: &str| predicate(t.parse().unwrap());
        assert_eq!(
            kind("arg1 <= 100"),
            ProbeKind::Predicate {
                arg: 1,
                cmp: Cmp::Lt,
                value: 101
            }
        );
        assert_eq!(
            kind("arg0>=1"),
            ProbeKind::Predicate {
                arg: 0,
                cmp: Cmp::Gt,
                value: 0
            }
        );
        assert_eq!(
            kind("arg2 == -1"),
            ProbeKind::Predicate {
                arg: 2,
                cmp: Cmp::Eq,
                value: u64::MAX
            }
        );
        for bad in [
            "arg0 >= 0",
            "arg0 <= 18446744073709551615",
            "arg6 == 1",
            "x == 1",
            "arg0 = 1",
            "arg0 => 1",
            "arg0 <> 1",
            "arg0 == ",
            "arg0 == 1 2",
            "arg0 < -1",
            "arg0 == 0xzz",
            "",
        ] {
            assert!(bad.parse::<WhenExpr>().is_err(), "{bad:?} accepted");
        }
        assert_eq!("arg3!=0x10".parse::<WhenExpr>().unwrap().value, 16);
    }

    #[test]
    fn kinds_check_their_arguments() {
        assert!(kind_of(ProbeKindName::Hist, None, None).is_err());
        assert!(kind_of(ProbeKindName::Hist, Some(6), None).is_err());
        assert!(kind_of(ProbeKindName::Count, Some(1), None).is_err());
        assert!(kind_of(ProbeKindName::When, None, None).is_err());
        assert!(kind_of(ProbeKindName::Latency, None, Some("arg0 == 1")).is_err());
        let (k, shown) = kind_of(ProbeKindName::Hist, Some(2), None).unwrap();
        assert_eq!(
            (k, shown.as_str()),
            (ProbeKind::Histogram { arg: 2 }, "hist arg2")
        );
        let (_, shown) = kind_of(ProbeKindName::When, None, Some("arg1>100")).unwrap();
        assert_eq!(shown, "when arg1 > 100");
    }

    #[test]
    fn percentiles_are_bucket_upper_bounds() {
        // 90 calls in [512, 1024) ns, 10 in [4096, 8192).
        let h = [(512, 90), (4096, 10)];
        assert_eq!(percentile(&h, 0.5, 6000.0), 1024.0);
        assert_eq!(percentile(&h, 0.99, 6000.0), 6000.0);
        assert_eq!(percentile(&[], 0.5, 0.0), 0.0);
    }
}
