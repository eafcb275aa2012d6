//! Glob patterns over function names: `*` matches any run of characters, `?` one character.

/// True if `pattern` contains a wildcard.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Whether `name` matches `pattern` entirely.
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
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
    }
}
