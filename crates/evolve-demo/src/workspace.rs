//! A private copy of an example (the kv server, the http service) as its own cargo workspace.
//!
//! Patches are built from edited source against the running program, with the same toolchain,
//! lockfile and profile; editing the repository's own example would leave it dirty, so every user
//! of the example (demo, test, benchmark) works on a copy under `target-copies/evolve-demo/<name>`, with
//! a workspace manifest derived from the repository's (same lints, profiles and dependency
//! versions). All copies share the repository's cargo target directory, so dependencies the
//! repository already compiled are not compiled again.

use anyhow::{anyhow, bail, Context, Result};
use evolve_builder::so::{build_patch, Base, BuildOptions, BuildReport};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An example of the repository, as its workspace copies build and patch it.
#[derive(Debug)]
pub struct Example {
    /// Its directory, relative to the repository.
    pub dir: &'static str,
    /// Its crates (subdirectories), copied into each workspace.
    pub crates: &'static [&'static str],
    /// The package of its server binary (also the binary's name).
    pub server: &'static str,
    /// The package whose library patches carry.
    pub patched: &'static str,
    /// The patched package's features as the server's build resolves them, and whether its
    /// defaults are off.
    pub patched_features: &'static [&'static str],
    /// See [`Example::patched_features`].
    pub patched_no_default_features: bool,
    /// Whether the server has a Cargo feature `evolve` (on by default) to build it without
    /// Evolve ([`Flavor::Plain`]).
    pub has_plain_flavor: bool,
    /// Asks the server at this address to exit (best effort).
    pub shutdown: fn(SocketAddr),
}

/// The kv example: a Redis-protocol server, one thread per connection.
pub static KV: Example = Example {
    dir: "examples/kv",
    crates: &["kv-core", "kv-commands", "kv-server"],
    server: "kv-server",
    patched: "kv-commands",
    // kv-server's `evolve` feature enables kv-commands's, without kv-commands's defaults.
    patched_features: &["evolve"],
    patched_no_default_features: true,
    has_plain_flavor: true,
    shutdown: |addr| {
        if let Ok(mut client) = crate::client::Client::connect(addr) {
            let _ = client.send(&[b"SHUTDOWN"]);
        }
    },
};

/// The http example: an async HTTP service on Tokio and axum.
pub static HTTP: Example = Example {
    dir: "examples/http",
    crates: &["http-handlers", "http-server"],
    server: "http-server",
    patched: "http-handlers",
    patched_features: &[],
    patched_no_default_features: false,
    has_plain_flavor: false,
    shutdown: |addr| {
        let _ = crate::http::request(addr, "POST", "/shutdown");
    },
};

/// How the server is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// With Evolve: hot handlers, the multiverse switch, the agent.
    Evolve,
    /// Without any Evolve code: the benchmark's baseline.
    Plain,
}

/// The repository's root.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A copy of the kv example (what most users of this module want).
pub type KvWorkspace = ExampleWorkspace;

/// A copy of an example.
#[derive(Debug, Clone)]
pub struct ExampleWorkspace {
    /// The example.
    pub example: &'static Example,
    /// The workspace's root.
    pub dir: PathBuf,
    /// The cargo target directory: the repository's own, shared by all copies.
    pub target: PathBuf,
    /// Whether cargo's progress is shown.
    pub verbose: bool,
}

impl ExampleWorkspace {
    /// Copies the kv example afresh to `target-copies/evolve-demo/<name>` (replacing an older copy).
    pub fn prepare(name: &str) -> Result<ExampleWorkspace> {
        ExampleWorkspace::prepare_example(&KV, name)
    }

    /// Copies `example` afresh to `target-copies/evolve-demo/<name>` (replacing an older copy).
    pub fn prepare_example(example: &'static Example, name: &str) -> Result<ExampleWorkspace> {
        let repository = repository()
            .canonicalize()
            .context("finding the repository")?;
        let cargo_target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repository.join("target"));
        // Beside the target directory, never inside it: cargo records a source file under the
        // target directory relative to it, not to its package, so a copy inside would have its
        // freshness checked against the files of whichever copy built that crate last.
        let mut copies = cargo_target.clone().into_os_string();
        copies.push("-copies");
        let root = PathBuf::from(copies).join("evolve-demo");
        let dir = root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        for krate in example.crates {
            copy_dir(&repository.join(example.dir).join(krate), &dir.join(krate))?;
        }
        let manifest = std::fs::read_to_string(repository.join("Cargo.toml"))?;
        std::fs::write(
            dir.join("Cargo.toml"),
            workspace_manifest(&manifest, &repository, example.crates)?,
        )?;
        std::fs::copy(repository.join("Cargo.lock"), dir.join("Cargo.lock"))?;
        Ok(ExampleWorkspace {
            example,
            dir,
            // The repository's own target directory: the copy's dependencies are the
            // repository's (same lockfile, manifest and profile), already compiled there.
            target: cargo_target,
            verbose: false,
        })
    }

    /// Builds the server (release profile) and returns a copy of its binary private to this
    /// workspace and flavor (both flavors share the target directory's `release/<server>`).
    pub fn build(&self, flavor: Flavor) -> Result<PathBuf> {
        let server = self.example.server;
        let mut cargo = self.cargo("build");
        cargo.args(["-p", server]);
        if flavor == Flavor::Plain {
            if !self.example.has_plain_flavor {
                bail!("{server} has no build without Evolve");
            }
            cargo.arg("--no-default-features");
        }
        run(&mut cargo, &format!("building {server}"))?;
        let bin = self.dir.join("bin").join(match flavor {
            Flavor::Evolve => "evolve",
            Flavor::Plain => "plain",
        });
        std::fs::create_dir_all(&bin)?;
        let binary = bin.join(server);
        // Not a hard link: the next build rewrites the target's file in place.
        std::fs::copy(self.target.join("release").join(server), &binary)?;
        Ok(binary)
    }

    /// Rebuilds the server (release profile, Evolve flavor) after an edit: the user's
    /// incremental `cargo build --release`.
    pub fn rebuild(&self) -> Result<()> {
        let server = self.example.server;
        let mut cargo = self.cargo("build");
        cargo.args(["-p", server]);
        run(&mut cargo, &format!("rebuilding {server}"))
    }

    fn cargo(&self, command: &str) -> Command {
        let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cargo
            .arg(command)
            .arg("--release")
            .arg("--manifest-path")
            .arg(self.dir.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &self.target);
        if !self.verbose {
            cargo.arg("--quiet");
        }
        cargo
    }

    /// Applies `<example>/patches/<name>.diff` to this copy's source, as an operator would with
    /// `git apply`.
    pub fn apply_source_patch(&self, name: &str) -> Result<()> {
        let path = repository()
            .join(self.example.dir)
            .join("patches")
            .join(format!("{name}.diff"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for (file, patch) in split_diff(&text, self.example.dir)? {
            let target = self.dir.join(&file);
            let base = std::fs::read_to_string(&target)
                .with_context(|| format!("{name}: reading {}", target.display()))?;
            let patch = diffy::Patch::from_str(&patch)
                .map_err(|e| anyhow!("{name}: the diff of {file} is malformed: {e}"))?;
            let patched = diffy::apply(&base, &patch)
                .map_err(|e| anyhow!("{name}: does not apply to {file}: {e}"))?;
            std::fs::write(&target, patched)?;
        }
        Ok(())
    }

    /// Replaces the first `old` of `file` (relative to the copy's root) by `new`: a one-line edit.
    pub fn edit(&self, file: &str, old: &str, new: &str) -> Result<()> {
        let path = self.dir.join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        if !text.contains(old) {
            bail!("{file} has no {old:?}");
        }
        std::fs::write(&path, text.replacen(old, new, 1))?;
        Ok(())
    }

    /// Builds a patch (format 1) of the example's patched package (as edited now) against the running process `pid`;
    /// writes it to `<dir>/<name>.so`.
    pub fn build_patch(&self, pid: u32, name: &str) -> Result<PathBuf> {
        Ok(self.build_patch_report(pid, name)?.output)
    }

    /// [`Self::build_patch`], with the builder's report.
    pub fn build_patch_report(&self, pid: u32, name: &str) -> Result<BuildReport> {
        let report = build_patch(&BuildOptions {
            manifest_path: self.dir.join("Cargo.toml"),
            package: self.example.patched.into(),
            base: Base::Pid(pid),
            output: self.dir.join(format!("{name}.so")),
            profile: "release".into(),
            env: vec![(
                "CARGO_TARGET_DIR".into(),
                self.target.to_string_lossy().into_owned(),
            )],
            features: self
                .example
                .patched_features
                .iter()
                .map(|f| f.to_string())
                .collect(),
            no_default_features: self.example.patched_no_default_features,
            built_with: Vec::new(),
        })?;
        Ok(report)
    }
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("{what}: cannot run cargo"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

/// The copy's workspace manifest: the repository's, with the example's crates as members and
/// the repository's crates by absolute path.
fn workspace_manifest(manifest: &str, repository: &Path, crates: &[&str]) -> Result<String> {
    let members = crates
        .iter()
        .map(|c| format!("{c:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = String::new();
    let mut in_workspace = false;
    for line in manifest.lines() {
        if line.starts_with('[') {
            in_workspace = line.trim() == "[workspace]";
        }
        if in_workspace && line.starts_with("members") {
            out.push_str(&format!("members = [{members}]\n"));
        } else if in_workspace && line.starts_with("exclude") {
            continue;
        } else {
            let absolute = format!("path = \"{}/crates/", repository.display());
            out.push_str(&line.replace("path = \"crates/", &absolute));
            out.push('\n');
        }
    }
    if !out.contains("members = [") {
        bail!("the repository's Cargo.toml has no workspace members line");
    }
    Ok(out)
}

/// Splits a multi-file unified diff (as `git diff` writes it) into (path relative to the
/// example's directory `example_dir`, single-file diff).
fn split_diff(text: &str, example_dir: &str) -> Result<Vec<(String, String)>> {
    let prefix = format!("{example_dir}/");
    let mut files: Vec<(String, String)> = Vec::new();
    for line in text.split_inclusive('\n') {
        if line.starts_with("diff ") {
            files.push((String::new(), String::new()));
            continue;
        }
        let Some((path, body)) = files.last_mut() else {
            continue;
        };
        if let Some(name) = line.strip_prefix("+++ b/") {
            let name = name.trim_end();
            *path = name
                .split_once(prefix.as_str())
                .map_or(name, |(_, rest)| rest)
                .to_string();
        }
        // Headers other than ---/+++ (index, mode) are git's, not the unified format's.
        if body.is_empty() && !line.starts_with("--- ") {
            continue;
        }
        body.push_str(line);
    }
    if files.is_empty() || files.iter().any(|(path, _)| path.is_empty()) {
        bail!("not a diff made by `git diff`");
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_patches_parse_into_files_of_the_example() {
        for name in ["01-incr-type-check", "02-append-command"] {
            let path = repository().join(format!("examples/kv/patches/{name}.diff"));
            let files = split_diff(&std::fs::read_to_string(path).unwrap(), KV.dir).unwrap();
            assert!(!files.is_empty());
            for (file, patch) in files {
                assert!(file.starts_with("kv-commands/src/"), "{file}");
                diffy::Patch::from_str(&patch).unwrap();
            }
        }
    }

    #[test]
    fn the_copy_manifest_names_the_example_and_absolute_crates() {
        let manifest = "[workspace]\nmembers = [\"crates/a\"]\nexclude = [\"x\"]\n\n\
                        [workspace.dependencies]\nevolve = { path = \"crates/evolve\" }\n";
        let out = workspace_manifest(manifest, Path::new("/repo"), KV.crates).unwrap();
        assert!(out.contains("members = [\"kv-core\", \"kv-commands\", \"kv-server\"]"));
        assert!(out.contains("evolve = { path = \"/repo/crates/evolve\" }"));
        assert!(!out.contains("exclude"));
    }
}
