//! Glob patterns over function names: `*` matches any run of characters, `?` one character.

/// True if `pattern` contains a wildcard.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Whether `name` matches `pattern` entirely.
///
/// ```
/// assert!(evolve_probes::glob_matches("kv_commands::*", "kv_commands::strings::get"));
/// assert!(!evolve_probes::glob_matches("kv_commands::?et", "kv_commands::set_ex"));
/// ```
///
/// Allocation-free (it runs over every symbol of every loaded image on each `add`): bytes for
/// ASCII, characters otherwise, so that `?` always matches one character.
pub fn matches(pattern: &str, name: &str) -> bool {
    if pattern.is_ascii() && name.is_ascii() {
        match_slices(pattern.as_bytes(), name.as_bytes(), b'*', b'?')
    } else {
        let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
        match_slices(&p, &n, '*', '?')
    }
}

fn match_slices<T: PartialEq + Copy>(p: &[T], n: &[T], any: T, one: T) -> bool {
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        // A `*` in the pattern is a wildcard even where the name holds a literal `*`: it is
        // tried first, so `<*` never matches the name's `*` as a plain character and leaves
        // no way back to treat it as a wildcard.
        if pi < p.len() && p[pi] == any {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && (p[pi] == one || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == any)
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs_match_rust_paths() {
        assert!(matches("kv::commands::*", "kv::commands::get"));
        assert!(matches("kv::*::get", "kv::commands::get"));
        assert!(!matches("kv::commands::*", "kv::other::get"));
        assert!(matches("str?en", "strlen"));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exactly"));
        assert!(matches("caf?::*", "café::x"));
        assert!(!matches("caf??::*", "café::x"));
    }

    #[test]
    fn a_star_stays_a_wildcard_when_the_name_holds_a_literal_star() {
        assert!(matches("drop_in_place<*", "drop_in_place<*const u8>"));
        assert!(matches("*<*mut *>", "core::ptr::drop_in_place<*mut [u8]>"));
        assert!(matches("f*", "f*"));
        assert!(!matches("drop_in_place<*>x", "drop_in_place<*const u8>"));
    }
}
