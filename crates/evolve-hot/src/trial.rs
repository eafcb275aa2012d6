//! Trials: a patch applied on trial reverts itself if its code panics within the window.
//!
//! A panic hook (installed once, chaining to the previous hook) walks the panicking thread's
//! stack; if a frame lies in the code of a patch whose trial window is still open, the patch is
//! reverted before the panic goes on (or, if the panic happened while Evolve's own state was
//! locked, right after, on another thread).

use crate::patch::{revert, Revert};
use evolve_code::Hidden;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

struct Trial {
    patch: String,
    /// Hidden from reclamation's scans (see `evolve_code::Hidden`).
    code: Vec<(Hidden, Hidden)>,
    until: Instant,
}

static TRIALS: Mutex<Vec<Trial>> = Mutex::new(Vec::new());
static HOOK: Once = Once::new();

/// Puts `patch`, whose code is `code`, on trial for `window`.
pub(crate) fn watch(patch: &str, code: Vec<(Hidden, Hidden)>, window: Duration) {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            on_panic();
            previous(info);
        }));
    });
    let mut trials = TRIALS.lock().unwrap_or_else(|p| p.into_inner());
    trials.retain(|t| t.until > Instant::now());
    trials.push(Trial {
        patch: patch.to_string(),
        code,
        until: Instant::now() + window,
    });
}

/// Whether `patch` is on trial now (reclamation leaves it alone).
pub(crate) fn on_trial(patch: &str) -> bool {
    let now = Instant::now();
    TRIALS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|t| t.patch == patch && t.until > now)
}

fn on_panic() {
    let culprit = {
        let Ok(mut trials) = TRIALS.try_lock() else {
            return;
        };
        let now = Instant::now();
        trials.retain(|t| t.until > now);
        if trials.is_empty() {
            return;
        }
        let mut frames = Vec::new();
        backtrace::trace(|frame| {
            frames.push(frame.ip() as usize);
            frames.len() < 128
        });
        let found = trials.iter().position(|t| {
            frames
                .iter()
                .any(|ip| t.code.iter().any(|r| (r.0.get()..r.1.get()).contains(ip)))
        });
        found.map(|i| trials.remove(i).patch)
    };
    let Some(patch) = culprit else { return };
    let undo = move || match revert(Revert::Patch(patch.clone())) {
        Ok(_) => eprintln!("evolve: patch {patch} panicked during its trial: reverted"),
        Err(e) => eprintln!("evolve: patch {patch} panicked during its trial; revert failed: {e}"),
    };
    if crate::patch::state_is_free() {
        undo();
    } else {
        std::thread::spawn(undo);
    }
}
