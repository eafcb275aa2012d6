//! Discovery: how the running program was built, read from the program and its cargo target
//! directory — never asked of the user.
//!
//! Cargo keeps every configuration's binary as `target/<profile>/deps/<bin>-<unit hash>`, and
//! for each unit a fingerprint (`target/<profile>/.fingerprint/<package>-<unit hash>/`: features,
//! profile and flags hashes, toolchain hash, and the fingerprints of the units it depends on).
//! The unit whose binary has the running build id (or, when it was rebuilt since, whose binary
//! defines the program's own `main` symbol: symbol hashes change with the configuration, not
//! with the source) is the program's configuration: its profile is the directory, its features
//! and those of the workspace crates it links are in the fingerprints. The unit hash covers the
//! whole configuration, so the rebuild is checked against it afterwards.

use crate::error::{Error, ErrorKind, Result};
use crate::program::Program;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A package of the program's workspace.
#[derive(Debug, Clone)]
pub struct Member {
    /// Package name.
    pub package: String,
    /// Cargo's package id.
    pub id: String,
    /// Its library's crate name, if it has a library.
    pub lib_crate: Option<String>,
    /// Its binaries' target names.
    pub bins: Vec<String>,
}

/// The program's build configuration.
#[derive(Debug, Clone)]
pub struct Configuration {
    /// The workspace's `Cargo.toml`.
    pub manifest_path: PathBuf,
    /// Cargo's target directory.
    pub target_dir: PathBuf,
    /// The cargo profile (`release`, `dev`, a custom one).
    pub profile: String,
    /// Its directory under the target directory (`release`, `debug`, …).
    pub profile_dir: String,
    /// The package of the binary.
    pub package: String,
    /// The binary target.
    pub bin: String,
    /// Its crate name (`-` as `_`).
    pub bin_crate: String,
    /// The unit hash of the program's build (`deps/<bin_crate>-<unit>`).
    pub unit: String,
    /// The binary unit's features (`default` included when enabled).
    pub features: Vec<String>,
    /// Whether its package declares a `default` feature.
    pub declares_default: bool,
    /// The features of the other workspace crates the program links, by package.
    pub member_features: BTreeMap<String, Vec<String>>,
    /// The binary unit's fingerprint before the rebuild.
    pub fingerprint: Value,
    /// The workspace's packages.
    pub members: Vec<Member>,
    /// How the unit was found: by `build id`, or by `symbols` (rebuilt since, same
    /// configuration).
    pub found_by: &'static str,
}

impl Configuration {
    /// The directory of the profile's build (`<target>/<profile dir>`).
    pub fn profile_path(&self) -> PathBuf {
        self.target_dir.join(&self.profile_dir)
    }

    /// The binary unit's fingerprint directory.
    pub fn fingerprint_dir(&self, unit: &str) -> PathBuf {
        self.profile_path()
            .join(".fingerprint")
            .join(format!("{}-{unit}", self.package))
    }

    /// The workspace member whose library is `krate`, if any.
    pub fn member_of_crate(&self, krate: &str) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.lib_crate.as_deref() == Some(krate))
    }
}

/// What the caller imposes instead of discovering.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// The cargo profile.
    pub profile: Option<String>,
    /// The binary package's features (replacing the discovered ones).
    pub features: Option<Vec<String>>,
    /// Build the binary package without its default features.
    pub no_default_features: bool,
}

pub(crate) fn run(command: &mut Command, what: &str) -> Result<String> {
    let output = command.output().map_err(|e| {
        Error::new(ErrorKind::Cargo {
            command: what.to_string(),
            output: e.to_string(),
        })
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        return Err(Error::new(ErrorKind::Cargo {
            command: what.to_string(),
            output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        }));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The workspace directory of a manifest path (`Cargo.toml` alone: the current directory).
pub fn workdir(manifest_path: &Path) -> PathBuf {
    manifest_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `rustc -V` as the workspace builds (rustup honours its toolchain file there).
pub fn toolchain(manifest_path: &Path, env: &[(String, String)]) -> Result<String> {
    Ok(run(
        Command::new("rustc")
            .arg("-V")
            .current_dir(workdir(manifest_path))
            .envs(env.iter().map(|(k, v)| (k, v))),
        "rustc -V",
    )?
    .trim()
    .to_string())
}

/// Refuses a program built by another toolchain than the workspace's (its `.comment` names
/// it: `rustc version 1.95.0 (…)`; `rustc -V` says `rustc 1.95.0 (…)`).
pub fn check_toolchain(program: &Program, builder: &str) -> Result<()> {
    let Some(comment) = &program.rustc_comment else {
        return Ok(()); // no .comment: the fingerprint's toolchain hash decides after the build
    };
    let program_version = comment.trim_start_matches("rustc version ");
    let builder_version = builder.trim_start_matches("rustc ");
    if program_version == builder_version {
        Ok(())
    } else {
        Err(Error::new(ErrorKind::Toolchain {
            program: format!("rustc {program_version}"),
            builder: builder.to_string(),
        }))
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Discovers the configuration of `program`'s build in the workspace of `manifest_path`.
pub fn discover(
    program: &Program,
    manifest_path: &Path,
    env: &[(String, String)],
    overrides: &Overrides,
) -> Result<Configuration> {
    let metadata = run(
        cargo()
            .args([
                "metadata",
                "--format-version",
                "1",
                "--no-deps",
                "--manifest-path",
            ])
            .arg(manifest_path)
            .envs(env.iter().map(|(k, v)| (k, v))),
        "cargo metadata",
    )?;
    let metadata: Value = serde_json::from_str(&metadata)
        .map_err(|e| Error::discovery(format!("cargo metadata: {e}")))?;
    let target_dir = PathBuf::from(metadata["target_directory"].as_str().unwrap_or("target"));
    let members = members(&metadata);
    let bins: Vec<(&Member, &String)> = members
        .iter()
        .flat_map(|m| m.bins.iter().map(move |b| (m, b)))
        .collect();
    if bins.is_empty() {
        return Err(Error::discovery(format!(
            "the workspace of {} has no binary",
            manifest_path.display()
        )));
    }
    let profile_dirs = profile_dirs(&target_dir, overrides.profile.as_deref());
    let mut found = None;
    'search: for by_symbols in [false, true] {
        for dir in &profile_dirs {
            for (member, bin) in &bins {
                let krate = bin.replace('-', "_");
                for (unit, path) in units(&dir.join("deps"), &krate) {
                    if matches(program, &path, &krate, by_symbols) {
                        let by = if by_symbols { "symbols" } else { "build id" };
                        found = Some((dir.clone(), (*member).clone(), (*bin).clone(), unit, by));
                        break 'search;
                    }
                }
            }
        }
    }
    let Some((dir, member, bin, unit, found_by)) = found else {
        return Err(Error::discovery(format!(
            "no build of {} under {} has the program's build id {} or its symbols: was it built \
             from this workspace and this target directory (CARGO_TARGET_DIR)?",
            bins.iter()
                .map(|(_, b)| b.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            target_dir.display(),
            program.build_id
        )));
    };
    let profile_dir = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let profile = match profile_dir.as_str() {
        "debug" => "dev".to_string(),
        other => other.to_string(),
    };
    let fingerprint_dir = dir
        .join(".fingerprint")
        .join(format!("{}-{unit}", member.package));
    let fingerprint = read_fingerprint(&fingerprint_dir, "bin-")?;
    let features = fingerprint_features(&fingerprint, "features");
    let declares_default =
        fingerprint_features(&fingerprint, "declared_features").contains(&"default".to_string());
    let mut member_features = BTreeMap::new();
    collect_member_features(
        &dir.join(".fingerprint"),
        &fingerprint,
        &members,
        &mut member_features,
        0,
    );
    member_features.remove(&member.package);
    Ok(Configuration {
        manifest_path: manifest_path.to_path_buf(),
        target_dir,
        profile,
        profile_dir,
        package: member.package.clone(),
        bin_crate: bin.replace('-', "_"),
        bin,
        unit,
        features,
        declares_default,
        member_features,
        fingerprint,
        members,
        found_by,
    })
}

fn members(metadata: &Value) -> Vec<Member> {
    let ids: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| ids.contains(&p["id"].as_str().unwrap_or_default()))
        .map(|p| {
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            let has_kind = |t: &Value, kind: &str| {
                t["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k.as_str() == Some(kind)))
            };
            Member {
                package: p["name"].as_str().unwrap_or_default().to_string(),
                id: p["id"].as_str().unwrap_or_default().to_string(),
                lib_crate: targets
                    .iter()
                    .find(|t| {
                        has_kind(t, "lib") || has_kind(t, "rlib") || has_kind(t, "proc-macro")
                    })
                    .and_then(|t| t["name"].as_str())
                    .map(|n| n.replace('-', "_")),
                bins: targets
                    .iter()
                    .filter(|t| has_kind(t, "bin"))
                    .filter_map(|t| t["name"].as_str().map(str::to_string))
                    .collect(),
            }
        })
        .collect()
}

/// The profile directories of a target directory (`release`, `debug`, custom ones; also under
/// a target triple), or only the overridden profile's.
fn profile_dirs(target_dir: &Path, profile: Option<&str>) -> Vec<PathBuf> {
    let is_profile = |p: &Path| p.join("deps").is_dir() && p.join(".fingerprint").is_dir();
    if let Some(profile) = profile {
        let dir = match profile {
            "dev" | "test" => "debug",
            "bench" => "release",
            other => other,
        };
        return vec![target_dir.join(dir)];
    }
    let mut dirs = Vec::new();
    let Ok(entries) = std::fs::read_dir(target_dir) else {
        return dirs;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if is_profile(&path) {
            dirs.push(path);
        }
    }
    // release first: the usual case.
    dirs.sort_by_key(|d| d.file_name().is_none_or(|n| n != "release"));
    dirs
}

/// The `deps/<krate>-<16 hex>` executables of a profile: (unit hash, path).
fn units(deps: &Path, krate: &str) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(deps) else {
        return Vec::new();
    };
    let prefix = format!("{krate}-");
    let mut units: Vec<(String, PathBuf, std::time::SystemTime)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let unit = name.strip_prefix(&prefix)?;
            (unit.len() == 16 && unit.bytes().all(|b| b.is_ascii_hexdigit())).then(|| {
                let modified = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (unit.to_string(), e.path(), modified)
            })
        })
        .collect();
    units.sort_by_key(|u| std::cmp::Reverse(u.2));
    units.into_iter().map(|(u, p, _)| (u, p)).collect()
}

/// Whether the binary at `path` is the program: the same build id, or (`by_symbols`) the same
/// mangled `main` of its crate (its hash depends on the configuration, not on the source).
fn matches(program: &Program, path: &Path, krate: &str, by_symbols: bool) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    let Ok(candidate) = Program::parse(data, &path.display().to_string()) else {
        return false;
    };
    if !by_symbols {
        return candidate.build_id == program.build_id;
    }
    let main = format!("{krate}::main");
    program
        .names()
        .filter(|n| crate::compare::readable(n) == main)
        .any(|n| candidate.defines(n))
}

fn read_fingerprint(dir: &Path, kind: &str) -> Result<Value> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(kind) && name.ends_with(".json") {
            let text = std::fs::read_to_string(entry.path()).map_err(|e| Error::io(dir, e))?;
            return serde_json::from_str(&text)
                .map_err(|e| Error::discovery(format!("{}: {e}", entry.path().display())));
        }
    }
    Err(Error::discovery(format!(
        "no fingerprint in {}",
        dir.display()
    )))
}

/// A fingerprint's feature list (stored as the text of a list: `"[\"default\", \"x\"]"`).
pub fn fingerprint_features(fingerprint: &Value, field: &str) -> Vec<String> {
    let text = fingerprint[field].as_str().unwrap_or("[]");
    serde_json::from_str(text).unwrap_or_default()
}

/// The unit fingerprint values a fingerprint depends on: (crate name, value).
fn fingerprint_deps(fingerprint: &Value) -> Vec<(String, u64)> {
    fingerprint["deps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| Some((d[1].as_str()?.to_string(), d[3].as_u64()?)))
        .collect()
}

/// Walks the fingerprints of the workspace crates `fingerprint` depends on (by the values it
/// recorded, found in the `lib-<name>` files) and records their features.
fn collect_member_features(
    fingerprints: &Path,
    fingerprint: &Value,
    members: &[Member],
    out: &mut BTreeMap<String, Vec<String>>,
    depth: usize,
) {
    if depth > 16 {
        return;
    }
    for (krate, value) in fingerprint_deps(fingerprint) {
        let Some(member) = members
            .iter()
            .find(|m| m.lib_crate.as_deref() == Some(krate.as_str()))
        else {
            continue;
        };
        if out.contains_key(&member.package) {
            continue;
        }
        let Some(dep) = find_unit_fingerprint(fingerprints, &member.package, &krate, value) else {
            continue;
        };
        out.insert(
            member.package.clone(),
            fingerprint_features(&dep, "features"),
        );
        collect_member_features(fingerprints, &dep, members, out, depth + 1);
    }
}

/// The fingerprint (JSON) of `package`'s library unit whose recorded value is `value`.
fn find_unit_fingerprint(
    fingerprints: &Path,
    package: &str,
    krate: &str,
    value: u64,
) -> Option<Value> {
    let wanted = [
        format!("{value:016x}"),
        value
            .to_le_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    ];
    let prefix = format!("{package}-");
    for entry in std::fs::read_dir(fingerprints).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) {
            continue;
        }
        let hash_file = entry.path().join(format!("lib-{krate}"));
        let Ok(content) = std::fs::read_to_string(&hash_file) else {
            continue;
        };
        if wanted.iter().any(|w| content.trim() == w) {
            let json =
                std::fs::read_to_string(entry.path().join(format!("lib-{krate}.json"))).ok()?;
            return serde_json::from_str(&json).ok();
        }
    }
    None
}

/// Compares the program's binary unit fingerprint with the rebuild's and names what differs.
pub fn configuration_difference(
    config: &Configuration,
    rebuilt: &Value,
    rebuilt_unit: &str,
) -> Option<Error> {
    let old = &config.fingerprint;
    let fields = [
        ("rustc", "toolchain"),
        ("features", "features"),
        ("profile", "profile"),
        ("rustflags", "flags"),
        ("target", "target"),
        ("config", "cargo configuration"),
        ("compile_kind", "target"),
    ];
    for (field, cause) in fields {
        if old[field] != rebuilt[field] {
            let detail = match field {
                "features" => format!(
                    "the program's `{}` was built with features {}, the rebuild has {} (the \
                     features given override the discovered ones)",
                    config.bin, old[field], rebuilt[field]
                ),
                "profile" => format!(
                    "the settings of profile `{}` changed since the program was built \
                     (Cargo.toml [profile.{}], CARGO_PROFILE_* variables or .cargo/config): \
                     restore them, or rebuild and restart the program",
                    config.profile, config.profile
                ),
                "rustflags" => format!(
                    "the program was built with RUSTFLAGS {}, the rebuild with {} (set them as \
                     they were)",
                    old[field], rebuilt[field]
                ),
                "rustc" => "the toolchain (rustc) differs".to_string(),
                _ => format!("{field}: {} vs {}", old[field], rebuilt[field]),
            };
            return Some(Error::configuration(cause, detail));
        }
    }
    let names = |v: &Value| {
        fingerprint_deps(v)
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    };
    if names(old) != names(rebuilt) {
        return Some(Error::configuration(
            "dependencies",
            format!(
                "the program links {:?}, the rebuild {:?}",
                names(old),
                names(rebuilt)
            ),
        ));
    }
    if rebuilt_unit != config.unit {
        let fingerprints = config.profile_path().join(".fingerprint");
        let differences = closure_differences(&fingerprints, old, rebuilt);
        let which = if differences.is_empty() {
            "a dependency was built with other settings".to_string()
        } else {
            differences.join("; ")
        };
        return Some(Error::configuration(
            "dependencies",
            format!(
                "the rebuild is unit {rebuilt_unit}, the program unit {}: {which}. Cargo \
                 unifies features over the packages one command builds: the program was built \
                 together with other packages; build it alone (`cargo build -p {}`) and \
                 restart it, or build the patch with the same packages",
                config.unit, config.package
            ),
        ));
    }
    None
}

/// The features of every unit a fingerprint depends on, transitively, by crate name (the first
/// unit found for a name).
fn closure_features(fingerprints: &Path, fingerprint: &Value) -> BTreeMap<String, Vec<String>> {
    let units: Vec<(PathBuf, String)> = std::fs::read_dir(fingerprints)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|dir| {
            std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|f| {
                    let name = f.file_name().to_string_lossy().into_owned();
                    let krate = name.strip_prefix("lib-")?;
                    (!krate.ends_with(".json")).then(|| {
                        let content = std::fs::read_to_string(f.path()).unwrap_or_default();
                        (f.path(), content.trim().to_string())
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let mut out = BTreeMap::new();
    let mut work = vec![fingerprint.clone()];
    while let Some(current) = work.pop() {
        for (krate, value) in fingerprint_deps(&current) {
            if out.contains_key(&krate) {
                continue;
            }
            let wanted: String = value
                .to_le_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let Some((path, _)) = units.iter().find(|(path, content)| {
                *content == wanted
                    && path
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy() == format!("lib-{krate}"))
            }) else {
                continue;
            };
            let Some(dep) = std::fs::read_to_string(path.with_extension("json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            else {
                continue;
            };
            out.insert(krate, fingerprint_features(&dep, "features"));
            work.push(dep);
        }
    }
    out
}

/// The crates whose features differ between two units' dependency closures (at most three).
fn closure_differences(fingerprints: &Path, old: &Value, rebuilt: &Value) -> Vec<String> {
    let (before, after) = (
        closure_features(fingerprints, old),
        closure_features(fingerprints, rebuilt),
    );
    before
        .iter()
        .filter_map(|(krate, features)| {
            let now = after.get(krate)?;
            (now != features).then(|| {
                format!(
                    "`{krate}` has features [{}] in the program, [{}] in the rebuild",
                    features.join(", "),
                    now.join(", ")
                )
            })
        })
        .take(3)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_features_are_a_list_in_a_string() {
        let fp: Value = serde_json::json!({"features": "[\"default\", \"x\"]"});
        assert_eq!(fingerprint_features(&fp, "features"), ["default", "x"]);
        assert!(fingerprint_features(&fp, "declared_features").is_empty());
    }

    #[test]
    fn a_rebuild_with_other_features_is_named() {
        let fp = |features: &str| {
            serde_json::json!({"rustc": 1, "features": features, "profile": 2, "rustflags": [],
                "target": 3, "config": 4, "compile_kind": 0, "deps": []})
        };
        let config = Configuration {
            manifest_path: "Cargo.toml".into(),
            target_dir: "target".into(),
            profile: "release".into(),
            profile_dir: "release".into(),
            package: "app".into(),
            bin: "app".into(),
            bin_crate: "app".into(),
            unit: "0123456789abcdef".into(),
            features: vec![],
            declares_default: false,
            member_features: BTreeMap::new(),
            fingerprint: fp("[\"default\"]"),
            members: vec![],
            found_by: "",
        };
        let error = configuration_difference(&config, &fp("[\"loud\"]"), "fedcba9876543210")
            .expect("a difference");
        assert!(
            matches!(error.kind(), ErrorKind::Configuration { cause, .. } if cause == "features")
        );
        assert!(configuration_difference(&config, &fp("[\"default\"]"), &config.unit).is_none());
    }
}
