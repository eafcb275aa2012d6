//! The rebuild: the edited source built in place by cargo with the program's configuration —
//! the user's own incremental build, the same units in the same target directory — keeping the
//! objects the comparison needs.
//!
//! - Libraries: their objects are the `.rcgu.o` members of their rlibs, which cargo keeps.
//! - The binary crate: rustc links its objects and deletes them. A `RUSTC_WRAPPER` (cargo
//!   leaves it out of unit hashes and fingerprints, so the units stay the user's) adds
//!   `-C save-temps` to that one compilation: the objects stay, the code generated is the same
//!   (the binary's build id is unchanged), and the wrapper removes rustc's other leftovers. The
//!   binary unit's fingerprint file is removed first so that cargo recompiles it even when the
//!   user already built the edit. The wrapper also records rustc's arguments for that unit:
//!   they show the unit hash cargo chose and flags such as `-C lto`.

use crate::discover::{run, Configuration, Overrides};
use crate::error::{Error, ErrorKind, Result};
use crate::objfile::{is_bitcode, rlib_members, ObjectFile};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The rustc wrapper (POSIX shell): rustc as cargo asks, with `-C save-temps` for the binary
/// crate being patched.
const WRAPPER: &str = r#"#!/bin/sh
# Written by evolve's patch builder. Runs rustc as cargo asked; for the binary crate named by
# EVOLVE_BUILDER_BIN_CRATE also records its arguments and keeps its object files
# (-C save-temps), removing the temporary directories that flag would leave behind.
inner=${EVOLVE_BUILDER_INNER_WRAPPER:-}
name=; out=; bin=0; prev=
for arg in "$@"; do
  case "$prev" in
    --crate-name) name=$arg ;;
    --out-dir) out=$arg ;;
    --crate-type) [ "$arg" = bin ] && bin=1 ;;
  esac
  prev=$arg
done
if [ "$bin" = 1 ] && [ -n "$name" ] && [ "$name" = "$EVOLVE_BUILDER_BIN_CRATE" ]; then
  printf '%s\n' "$@" > "$EVOLVE_BUILDER_ARGS"
  before=$(ls -d "$out"/rustc* "$out"/rmeta* 2>/dev/null)
  ${inner:+"$inner"} "$@" -C save-temps
  status=$?
  for d in "$out"/rustc* "$out"/rmeta*; do
    [ -d "$d" ] || continue
    case "
$before
" in
      *"
$d
"*) ;;
      *) rm -rf "$d" ;;
    esac
  done
  exit $status
fi
exec ${inner:+"$inner"} "$@"
"#;

/// What the rebuild produced.
#[derive(Debug)]
pub struct Rebuild {
    /// The objects of the workspace crates the program links, and of the binary crate.
    pub objects: Vec<ObjectFile>,
    /// rustc's arguments for the binary crate.
    pub bin_args: Vec<String>,
    /// The unit hash cargo built the binary as.
    pub unit: String,
    /// The binary unit's fingerprint after the rebuild.
    pub fingerprint: Value,
    /// Crates cargo recompiled (not fresh).
    pub recompiled: Vec<String>,
    /// Seconds cargo took.
    pub seconds: f64,
}

/// The cargo command of the rebuild (without the wrapper's environment).
pub fn command(config: &Configuration, overrides: &Overrides) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "build".into(),
        "--manifest-path".into(),
        config.manifest_path.display().to_string(),
        "--profile".into(),
        config.profile.clone(),
        "-p".into(),
        config.package.clone(),
        "--bin".into(),
        config.bin.clone(),
    ];
    let (features, default) = match &overrides.features {
        Some(features) => (features.clone(), !overrides.no_default_features),
        None => (
            config
                .features
                .iter()
                .filter(|f| *f != "default")
                .cloned()
                .collect(),
            config.features.iter().any(|f| f == "default") || !config.declares_default,
        ),
    };
    let default = default && !overrides.no_default_features;
    if !default {
        args.push("--no-default-features".into());
    }
    let mut all: Vec<String> = features;
    // The workspace crates' features as the program's build resolved them (cargo may have
    // unified them over more packages than this one).
    for (package, features) in &config.member_features {
        all.extend(features.iter().map(|f| format!("{package}/{f}")));
    }
    if !all.is_empty() {
        args.push("--features".into());
        args.push(all.join(","));
    }
    args
}

/// Rebuilds the program (see the module docs) and collects the objects.
pub fn rebuild(
    config: &Configuration,
    overrides: &Overrides,
    env: &[(String, String)],
    scratch: &Path,
) -> Result<Rebuild> {
    let wrapper = scratch.join("rustc-wrapper");
    write_executable(&wrapper, WRAPPER)?;
    let args_log = scratch.join("bin-rustc-args");
    let inner = env
        .iter()
        .rev()
        .find(|(k, _)| k == "RUSTC_WRAPPER")
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var("RUSTC_WRAPPER").ok())
        .unwrap_or_default();
    // Make cargo recompile the binary crate (its objects are needed even if it is fresh) —
    // whichever of its units cargo picks: one of another configuration is reported after.
    let fingerprints = config.profile_path().join(".fingerprint");
    let prefix = format!("{}-", config.package);
    for entry in std::fs::read_dir(&fingerprints)
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path().join(format!("bin-{}", config.bin)));
        }
    }

    let args = command(config, overrides);
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .args(&args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(crate::discover::workdir(&config.manifest_path))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUSTC_WRAPPER", &wrapper)
        .env("EVOLVE_BUILDER_INNER_WRAPPER", inner)
        .env("EVOLVE_BUILDER_BIN_CRATE", &config.bin_crate)
        .env("EVOLVE_BUILDER_ARGS", &args_log);
    let started = Instant::now();
    let shown = format!("cargo {}", args.join(" "));
    let output = cargo.output().map_err(|e| {
        Error::new(ErrorKind::Cargo {
            command: shown.clone(),
            output: e.to_string(),
        })
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let messages: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if !output.status.success() {
        let mut rendered: Vec<String> = messages
            .iter()
            .filter(|m| m["reason"] == "compiler-message")
            .filter(|m| m["message"]["level"] == "error")
            .filter_map(|m| m["message"]["rendered"].as_str().map(str::to_string))
            .collect();
        let stderr = String::from_utf8_lossy(&output.stderr);
        rendered.extend(stderr.lines().rev().take(10).map(str::to_string));
        return Err(Error::new(ErrorKind::Cargo {
            command: shown,
            output: rendered.join("\n"),
        }));
    }
    let bin_args: Vec<String> = std::fs::read_to_string(&args_log)
        .map_err(|_| {
            Error::discovery(format!(
                "cargo did not compile the binary `{}` (no rustc arguments recorded)",
                config.bin
            ))
        })?
        .lines()
        .map(str::to_string)
        .collect();
    let unit = rustc_option(&bin_args, "extra-filename")
        .map(|v| v.trim_start_matches('-').to_string())
        .unwrap_or_default();
    let member_ids: Vec<&str> = config.members.iter().map(|m| m.id.as_str()).collect();
    let mut objects = Vec::new();
    let mut recompiled = Vec::new();
    for message in messages
        .iter()
        .filter(|m| m["reason"] == "compiler-artifact")
    {
        if !member_ids.contains(&message["package_id"].as_str().unwrap_or_default()) {
            continue;
        }
        let kinds = message["target"]["kind"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !kinds.iter().any(|k| k == "lib" || k == "rlib") {
            continue;
        }
        let krate = message["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .replace('-', "_");
        if message["fresh"] == false {
            recompiled.push(krate.clone());
        }
        for file in message["filenames"].as_array().into_iter().flatten() {
            let Some(path) = file.as_str().filter(|p| p.ends_with(".rlib")) else {
                continue;
            };
            let data = std::fs::read(path).map_err(|e| Error::io(Path::new(path), e))?;
            let rlib = Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for (member, bytes) in rlib_members(&data, path)? {
                if is_bitcode(&bytes) {
                    return Err(lto(config, &bin_args));
                }
                objects.push(ObjectFile::parse(
                    &bytes,
                    &format!("{rlib}({member})"),
                    &krate,
                )?);
            }
        }
    }
    if let Some(flag) = lto_flag(&bin_args) {
        return Err(Error::new(ErrorKind::Lto {
            profile: config.profile.clone(),
            flag,
        }));
    }
    recompiled.push(config.bin_crate.clone());
    objects.extend(take_bin_objects(config, &unit)?);
    let fingerprint_dir = config.fingerprint_dir(&unit);
    let fingerprint = std::fs::read_dir(&fingerprint_dir)
        .ok()
        .and_then(|entries| {
            entries.flatten().find_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name.starts_with("bin-") && name.ends_with(".json"))
                    .then(|| std::fs::read_to_string(e.path()).ok())
                    .flatten()
            })
        })
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    Ok(Rebuild {
        objects,
        bin_args,
        unit,
        fingerprint,
        recompiled,
        seconds,
    })
}

fn lto(config: &Configuration, bin_args: &[String]) -> Error {
    Error::new(ErrorKind::Lto {
        profile: config.profile.clone(),
        flag: lto_flag(bin_args).unwrap_or_else(|| "-C linker-plugin-lto".into()),
    })
}

/// The link-time-optimisation flag rustc was given, if any (`-C lto=off`/`no` is none).
fn lto_flag(args: &[String]) -> Option<String> {
    if let Some(value) = rustc_option(args, "lto") {
        return (!matches!(value.as_str(), "off" | "no" | "n" | "false"))
            .then(|| format!("-C lto={value}"));
    }
    if args.iter().any(|a| a == "lto") {
        return Some("-C lto".into());
    }
    args.iter()
        .any(|a| a == "linker-plugin-lto" || a.starts_with("linker-plugin-lto="))
        .then(|| "-C linker-plugin-lto".into())
}

/// The value of `-C name=value` in rustc's arguments.
fn rustc_option(args: &[String], name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        let a = a.strip_prefix("-C").map_or(a.as_str(), |rest| {
            if rest.is_empty() {
                args.get(i + 1).map_or("", String::as_str)
            } else {
                rest
            }
        });
        let _ = i;
        a.strip_prefix(&prefix).map(str::to_string)
    })
}

/// The binary crate's objects kept by `-C save-temps` (`deps/<crate>-<unit>.*.rcgu.o`): read,
/// then every file that flag left for the unit removed.
fn take_bin_objects(config: &Configuration, unit: &str) -> Result<Vec<ObjectFile>> {
    let deps = config.profile_path().join("deps");
    let prefix = format!("{}-{unit}.", config.bin_crate);
    let mut objects = Vec::new();
    let mut leftovers: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(&deps).map_err(|e| Error::io(&deps, e))? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) || !name.contains(".rcgu.") {
            continue;
        }
        if name.ends_with(".rcgu.o") {
            let data = std::fs::read(entry.path()).map_err(|e| Error::io(&entry.path(), e))?;
            if is_bitcode(&data) {
                continue;
            }
            let object = ObjectFile::parse(&data, &name, &config.bin_crate)?;
            // rustc's allocator shim and metadata objects define no code of the crate.
            if object.functions().next().is_some() {
                objects.push(object);
            }
        }
        leftovers.push(entry.path());
    }
    for path in leftovers {
        let _ = std::fs::remove_file(path);
    }
    if objects.is_empty() {
        return Err(Error::discovery(format!(
            "rustc left no objects of the binary crate `{}` in {}",
            config.bin_crate,
            deps.display()
        )));
    }
    Ok(objects)
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(path, e))
}

/// `cargo build` of the same configuration without the builder (the benchmark's baseline),
/// returning the seconds it took.
pub fn plain_build(
    config: &Configuration,
    overrides: &Overrides,
    env: &[(String, String)],
) -> Result<f64> {
    let args = command(config, overrides);
    let started = Instant::now();
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(&args)
            .arg("--quiet")
            .current_dir(crate::discover::workdir(&config.manifest_path))
            .envs(env.iter().map(|(k, v)| (k, v))),
        &format!("cargo {}", args.join(" ")),
    )?;
    Ok(started.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn rustc_options_are_found_split_or_joined() {
        let a = args(&["rustc", "-C", "extra-filename=-0123", "-Clto=fat"]);
        assert_eq!(rustc_option(&a, "extra-filename").as_deref(), Some("-0123"));
        assert_eq!(lto_flag(&a).as_deref(), Some("-C lto=fat"));
        assert_eq!(lto_flag(&args(&["-C", "lto=off"])), None);
        assert_eq!(
            lto_flag(&args(&["-C", "linker-plugin-lto"])).as_deref(),
            Some("-C linker-plugin-lto")
        );
        assert_eq!(lto_flag(&args(&["-C", "opt-level=3"])), None);
    }
}
