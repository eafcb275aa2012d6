//! `canary_start`, `canary_read`, `canary_finish`: the in-process canary of `evolve_hot::canary`.

use crate::protocol::{CanaryInfo, ErrorKind};
use evolve_hot::canary::{self, CanaryOptions, CanaryReading, Split};

type Outcome<T> = Result<T, (ErrorKind, String)>;

fn info(reading: &CanaryReading, promoted: Option<bool>) -> CanaryInfo {
    CanaryInfo {
        patch: reading.patch.clone(),
        split: reading.split.name().to_string(),
        fraction: reading.fraction,
        new_calls: reading.new_calls,
        old_calls: reading.old_calls,
        new_errors: reading.new_errors,
        old_errors: reading.old_errors,
        promoted,
    }
}

/// Starts a canary of the patch at `path` (checked against the trusted keys like `apply`).
pub fn start(path: &str, split: &str, fraction: f64, errors: &str) -> Outcome<CanaryInfo> {
    let path_ref = std::path::Path::new(path);
    if !path_ref.is_absolute() {
        return Err((
            ErrorKind::BadRequest,
            format!("patch path {path:?} is relative: the agent needs an absolute path"),
        ));
    }
    let split = Split::parse(split).ok_or_else(|| {
        (
            ErrorKind::BadRequest,
            format!("split {split:?}: expected calls, threads or connections"),
        )
    })?;
    crate::trust::check(path_ref).map_err(|e| (ErrorKind::Failed, e))?;
    let options = CanaryOptions {
        split,
        fraction,
        errors: errors
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect(),
    };
    canary::start(path_ref, &options)
        .map(|r| info(&r, None))
        .map_err(|e| (ErrorKind::Failed, e.to_string()))
}

/// The running canary's counts.
pub fn read() -> Outcome<CanaryInfo> {
    canary::read()
        .map(|r| info(&r, None))
        .ok_or_else(|| (ErrorKind::Failed, "no canary is running".into()))
}

/// Promotes or rolls back.
pub fn finish(max_ratio: f64) -> Outcome<CanaryInfo> {
    canary::finish(true, max_ratio)
        .map(|o| info(&o.reading, Some(o.applied.is_some())))
        .map_err(|e| (ErrorKind::Failed, e.to_string()))
}
