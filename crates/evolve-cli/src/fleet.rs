//! `evolve keygen`, `evolve node` and `evolve fleet …`: thin commands over `evolve-fleet`.
//!
//! The fleet commands run on a small tokio runtime (etcd-client is async).

use crate::outln;
use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Subcommand};
use evolve_fleet::artifact::ArtifactStore;
use evolve_fleet::controller::{self, Command as Operator, ControllerOptions, RolloutStatus};
use evolve_fleet::decide::Standing;
use evolve_fleet::host::AgentHost;
use evolve_fleet::model::*;
use evolve_fleet::node::{Node, NodeOptions};
use evolve_fleet::store::Store;
use evolve_fleet::trust::{SecretKey, SignatureFile, TrustedKeys};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::flags::parse_duration;

/// Where the fleet lives.
#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// etcd endpoints (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd: Vec<String>,
    /// The key prefix of this fleet in etcd.
    #[arg(long, default_value = evolve_fleet::keys::DEFAULT_PREFIX)]
    pub prefix: String,
}

/// `evolve keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The key's name (one word, e.g. `ops`).
    pub name: String,
    /// Where to write NAME.key (secret, mode 0600) and NAME.pub.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

/// `evolve node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// This node's name in the fleet (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// A label (`key=value`), repeatable; rollouts select nodes by label.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// The agents' socket directory to manage (default: this user's).
    #[arg(long)]
    pub socket_dir: Option<PathBuf>,
    /// Where fetched patches are kept (default: ~/.cache/evolve/node).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Apply only patches signed by these keys (a file of public keys or a directory of .pub).
    #[arg(long, value_name = "PATH")]
    pub trusted_keys: Option<PathBuf>,
    /// A command run after every apply (EVOLVE_PID, EVOLVE_NODE, EVOLVE_ROLLOUT set); a
    /// non-zero exit fails the node's health gate.
    #[arg(long, value_name = "COMMAND")]
    pub health_cmd: Option<String>,
    /// The lease TTL: a node silent for this long disappears from the fleet.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub lease_ttl: Duration,
    /// How often local processes are listed (restarted servers are re-patched this fast).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub scan_interval: Duration,
}

/// `evolve fleet`.
#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// What to do.
    #[command(subcommand)]
    pub action: FleetAction,
}

/// The fleet commands.
// Parsed once per run: the size of the largest variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum FleetAction {
    /// Roll a patch out: canary, then waves, gated on health; runs the controller until the
    /// rollout completes (exit 0) or aborts (exit 1), unless --detach.
    Rollout(RolloutArgs),
    /// A rollout's waves, nodes and their health (the newest rollout by default).
    Status {
        /// The rollout id.
        id: Option<String>,
        /// Redraw every second until the rollout ends.
        #[arg(long)]
        watch: bool,
    },
    /// Stop advancing (nodes keep what they have).
    Pause(OperatorArgs),
    /// Advance again.
    Resume(OperatorArgs),
    /// Revert every node the rollout touched.
    Abort(OperatorArgs),
    /// Every rollout, oldest first.
    History,
    /// Run a controller (leader-elected: several may run) that serves artifacts and the web
    /// page and takes every rollout's steps.
    Controller(ControllerArgs),
}

/// `fleet pause|resume|abort`.
#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// The rollout id (default: the newest).
    pub id: Option<String>,
    /// Why (shown in status and history).
    #[arg(long)]
    pub reason: Option<String>,
}

/// A controller's serving options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Serve artifacts and the web page on this address (port 0: any).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub serve: SocketAddr,
    /// The artifact store directory (default: ~/.cache/evolve/artifacts).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The controller's lease TTL: a dead leader is replaced after it.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub controller_ttl: Duration,
    /// The controller's name in the election (default: host:pid).
    #[arg(long)]
    pub controller_name: Option<String>,
}

/// `fleet controller`.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `fleet rollout`.
#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// The patch (from `evolve build-patch`; its PATCH.sig is carried if present).
    pub patch: PathBuf,
    /// Which processes: `build-id=HEX`, `program=NAME`, `label:KEY=VALUE` (repeatable; all
    /// must hold). Default: the build id the patch was made for.
    #[arg(long = "select", value_name = "SELECTOR")]
    pub select: Vec<String>,
    /// Nodes in the canary.
    #[arg(long, default_value_t = 1)]
    pub canary: usize,
    /// The waves after the canary, as percentages of the selected nodes.
    #[arg(long, value_delimiter = ',', default_value = "10%,50%,100%")]
    pub waves: Vec<String>,
    /// How long each converged step bakes before the next.
    #[arg(long, value_parser = parse_duration_or_zero, default_value = "30s")]
    pub bake: Duration,
    /// A health command each node runs after applying (exit 0 = healthy).
    #[arg(long, value_name = "COMMAND")]
    pub health: Option<String>,
    /// A probe gate `PATTERN<=N`: a count probe on PATTERN, at most N calls during the check.
    #[arg(long, value_name = "PATTERN<=N", value_parser = parse_probe_gate)]
    pub probe_max: Option<ProbeGate>,
    /// Apply on trial: the agent reverts the patch if its code panics within this window.
    #[arg(long, value_parser = parse_duration)]
    pub trial: Option<Duration>,
    /// How long each node watches its gates after applying.
    #[arg(long, value_parser = parse_duration_or_zero, default_value = "2s")]
    pub check: Duration,
    /// Failed or lost nodes allowed per wave (none in the canary).
    #[arg(long, default_value_t = 0)]
    pub failure_budget: usize,
    /// A step not converged within this time aborts the rollout.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub step_deadline: Duration,
    /// In-process canary on each node first: `SPLIT:FRACTION:WINDOW:ERRORS`, e.g.
    /// `threads:25%:5s:kv_core::stats::count_error`.
    #[arg(long, value_parser = parse_in_process)]
    pub in_process_canary: Option<InProcessCanary>,
    /// Another location serving the artifact (BASE/artifacts/SHA256), repeatable.
    #[arg(long, value_name = "BASE")]
    pub artifact_url: Vec<String>,
    /// Create the rollout and return (another controller takes its steps; serve the artifact
    /// elsewhere with --artifact-url).
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub serve: ServeArgs,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?}: a label is KEY=VALUE"))
}

fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    if matches!(text.trim(), "0" | "0s" | "0ms") {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

fn parse_percent(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{text:?} is not a percentage"))?;
    if !(value > 0.0 && value <= 100.0) {
        return Err(format!("{text:?}: a percentage is in (0, 100]"));
    }
    Ok(value)
}

fn parse_probe_gate(text: &str) -> Result<ProbeGate, String> {
    let (pattern, max) = text.split_once("<=").ok_or_else(|| {
        format!("{text:?}: expected PATTERN<=N, e.g. 'kv_core::stats::count_error<=0'")
    })?;
    Ok(ProbeGate {
        pattern: pattern.trim().to_string(),
        max_calls: max
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: N must be an integer"))?,
    })
}

fn parse_in_process(text: &str) -> Result<InProcessCanary, String> {
    let parts: Vec<&str> = text.splitn(4, ':').collect();
    let [split, fraction, window, errors] = parts.as_slice() else {
        return Err(format!("{text:?}: expected SPLIT:FRACTION:WINDOW:ERRORS"));
    };
    let split = match *split {
        "calls" => CanarySplit::Calls,
        "threads" => CanarySplit::Threads,
        "connections" => CanarySplit::Connections,
        other => {
            return Err(format!(
                "{other:?}: the split is calls, threads or connections"
            ))
        }
    };
    let fraction = parse_percent(fraction)? / 100.0;
    if fraction >= 1.0 {
        return Err("the in-process canary's fraction must be below 100%".into());
    }
    Ok(InProcessCanary {
        split,
        fraction,
        window_ms: parse_duration(window)?.as_millis() as u64,
        errors: errors.to_string(),
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn who() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    format!("{user}@{}", hostname())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn cache_dir(what: &str) -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("evolve")
        .join(what)
}

/// `evolve keygen NAME`.
pub fn keygen(json: bool, args: KeygenArgs) -> Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let key = SecretKey::generate(&args.name)?;
    let (secret, public) = key.save(&args.dir)?;
    if json {
        outln!(
            "{}",
            serde_json::json!({"name": args.name, "id": key.public().id(), "secret": secret, "public": public})
        );
    } else {
        outln!(
            "key {} ({}): secret {} (keep it private), public {} (give it to nodes and agents: \
             --trusted-keys / EVOLVE_TRUSTED_KEYS)",
            args.name,
            key.public().id(),
            secret.display(),
            public.display()
        );
    }
    Ok(())
}

/// Signs `patch` with the secret key at `key`: writes PATCH.sig.
pub fn sign(patch: &Path, key: &Path) -> Result<SignatureFile> {
    let key = SecretKey::load(key)?;
    let digest = evolve_fleet::trust::Digest::of_file(patch)?;
    let signature = key.sign(&digest);
    signature.write_for(patch)?;
    Ok(signature)
}

/// `evolve node`.
pub fn node(args: NodeArgs) -> Result<()> {
    let trusted = args
        .trusted_keys
        .as_deref()
        .map(TrustedKeys::load)
        .transpose()?;
    let socket_dir = args
        .socket_dir
        .clone()
        .unwrap_or_else(evolve_agent::paths::socket_dir);
    let options = NodeOptions {
        name: args.name.clone().unwrap_or_else(hostname),
        labels: args.labels.iter().cloned().collect(),
        lease_ttl_s: args.lease_ttl.as_secs().max(1) as i64,
        cache: args.cache.clone().unwrap_or_else(|| cache_dir("node")),
        trusted,
        health_command: args.health_cmd.clone(),
        scan_interval: args.scan_interval,
    };
    let runtime = runtime()?;
    runtime.block_on(async move {
        let store = connect(&args.etcd).await?;
        eprintln!(
            "evolve node {}: managing the agents in {}, fleet {} on {}",
            options.name,
            socket_dir.display(),
            args.etcd.prefix,
            args.etcd.etcd.join(",")
        );
        let node = Node::new(store, Arc::new(AgentHost::new(&socket_dir)), options)?;
        let (stop_sender, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            let _ = stop_sender.send(true);
        });
        node.run(stop).await?;
        Ok(())
    })
}

async fn connect(etcd: &EtcdArgs) -> Result<Store> {
    Ok(Store::connect(&etcd.etcd, &etcd.prefix).await?)
}

/// `evolve fleet …`.
pub fn fleet(json: bool, args: FleetArgs) -> Result<()> {
    let runtime = runtime()?;
    runtime.block_on(async move {
        let store = connect(&args.etcd).await?;
        match args.action {
            FleetAction::Rollout(rollout) => roll_out(json, &store, rollout).await,
            FleetAction::Status { id, watch } => status(json, &store, id.as_deref(), watch).await,
            FleetAction::Pause(o) => operate(json, &store, o, Operator::Pause).await,
            FleetAction::Resume(o) => operate(json, &store, o, Operator::Resume).await,
            FleetAction::Abort(o) => operate(json, &store, o, Operator::Abort).await,
            FleetAction::History => history(json, &store).await,
            FleetAction::Controller(c) => run_controller(json, &store, &c.serve, None)
                .await
                .map(|_| ()),
        }
    })
}

async fn serve(store: &Store, serve: &ServeArgs) -> Result<(ArtifactStore, SocketAddr)> {
    let artifacts = ArtifactStore::open(
        &serve
            .store
            .clone()
            .unwrap_or_else(|| cache_dir("artifacts")),
    )?;
    let addr = evolve_fleet::web::spawn(serve.serve, store.clone(), artifacts.clone())
        .await
        .with_context(|| format!("serving on {}", serve.serve))?;
    Ok((artifacts, addr))
}

async fn run_controller(
    json: bool,
    store: &Store,
    serve_args: &ServeArgs,
    until: Option<String>,
) -> Result<Option<Phase>> {
    let (_, addr) = serve(store, serve_args).await?;
    let name = serve_args
        .controller_name
        .clone()
        .unwrap_or_else(|| format!("{}:{}", hostname(), std::process::id()));
    if !json {
        eprintln!("controller {name}: page and artifacts on http://{addr}/");
    } else {
        outln!(
            "{}",
            serde_json::json!({"controller": name, "serving": format!("http://{addr}")})
        );
    }
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop_sender.send(true);
    });
    let options = ControllerOptions {
        name,
        lease_ttl_s: serve_args.controller_ttl.as_secs().max(1) as i64,
        until,
    };
    let phase = controller::run(
        store,
        &options,
        |step| {
            let last = step.state.transitions.last();
            if json {
                outln!(
                    "{}",
                    serde_json::json!({"rollout": step.rollout, "revision": step.revision, "phase": step.state.phase, "step": step.state.step, "why": last.map(|t| t.why.clone())})
                );
            } else if let Some(t) = last {
                outln!("[{}] {} — {}", step.rollout, step.state.phase, t.why);
            }
        },
        stop,
    )
    .await?;
    Ok(phase)
}

fn selector_for(args: &RolloutArgs) -> Result<Selector> {
    let mut selector = Selector::default();
    for s in &args.select {
        if let Some(id) = s.strip_prefix("build-id=") {
            selector.build_id = Some(id.to_string());
        } else if let Some(p) = s.strip_prefix("program=") {
            selector.program = Some(p.to_string());
        } else if let Some(l) = s.strip_prefix("label:") {
            let (k, v) = parse_label(l).map_err(|e| anyhow!(e))?;
            selector.labels.insert(k, v);
        } else {
            bail!("selector {s:?}: expected build-id=HEX, program=NAME or label:KEY=VALUE");
        }
    }
    if selector.build_id.is_none() {
        // The patch can only apply to the binary it was built for.
        let manifest = evolve_hot::patch::read_manifest(&args.patch)
            .with_context(|| format!("reading {}", args.patch.display()))?;
        selector.build_id = Some(manifest.base_build_id);
    }
    Ok(selector)
}

async fn roll_out(json: bool, store: &Store, args: RolloutArgs) -> Result<()> {
    let waves = args
        .waves
        .iter()
        .map(|w| parse_percent(w).map_err(|e| anyhow!(e)))
        .collect::<Result<Vec<f64>>>()?;
    if waves.windows(2).any(|w| w[0] >= w[1]) || waves.last() != Some(&100.0) {
        bail!("--waves must increase and end at 100%");
    }
    let selector = selector_for(&args)?;
    let signature = SignatureFile::read_for(&args.patch)?;
    let (artifacts, addr) = if args.detach {
        (
            ArtifactStore::open(
                &args
                    .serve
                    .store
                    .clone()
                    .unwrap_or_else(|| cache_dir("artifacts")),
            )?,
            None,
        )
    } else {
        let (a, addr) = serve(store, &args.serve).await?;
        (a, Some(addr))
    };
    let (sha256, size) = artifacts.add_file(&args.patch)?;
    if let Some(signature) = &signature {
        if signature.sha256 != sha256 {
            bail!(
                "{} does not match its signature {} (signed sha256:{}, file sha256:{}): sign it again",
                args.patch.display(),
                SignatureFile::path_for(&args.patch).display(),
                signature.sha256.short(),
                sha256.short()
            );
        }
    }
    let mut urls: Vec<String> = addr
        .iter()
        .map(|a| format!("http://{a}/artifacts/{sha256}"))
        .collect();
    urls.extend(
        args.artifact_url
            .iter()
            .map(|b| format!("{}/artifacts/{sha256}", b.trim_end_matches('/'))),
    );
    let created_ms = now_ms();
    let spec = RolloutSpec {
        id: format!("r{created_ms}-{}", &sha256.to_string()[..8]),
        created_ms,
        created_by: who(),
        artifact: Artifact {
            sha256,
            size,
            urls,
            signature,
            name: args
                .patch
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        },
        selector,
        canary: args.canary,
        waves,
        bake_ms: args.bake.as_millis() as u64,
        gates: Gates {
            health_command: args.health.clone(),
            probe: args.probe_max.clone(),
            trial_ms: args.trial.map(|t| t.as_millis() as u64),
            check_ms: args.check.as_millis() as u64,
            failure_budget: args.failure_budget,
            step_deadline_ms: args.step_deadline.as_millis() as u64,
            in_process_canary: args.in_process_canary.clone(),
        },
    };
    let state = controller::create(store, &spec, &who()).await?;
    if json {
        outln!(
            "{}",
            serde_json::json!({"rollout": spec.id, "phase": state.phase, "sha256": spec.artifact.sha256})
        );
    } else {
        outln!(
            "rollout {} of {} (sha256:{}{}) to {}: {}",
            spec.id,
            spec.artifact.name,
            sha256.short(),
            spec.artifact
                .signature
                .as_ref()
                .map_or(", unsigned".to_string(), |s| format!(
                    ", signed by {}",
                    s.key_name
                )),
            spec.selector.describe(),
            state
                .transitions
                .last()
                .map(|t| t.why.clone())
                .unwrap_or_default()
        );
    }
    if args.detach {
        return Ok(());
    }
    let phase = run_controller(json, store, &args.serve, Some(spec.id.clone())).await?;
    let final_status = controller::status(store, Some(&spec.id)).await?;
    if !json {
        print_status(&final_status);
    }
    match phase {
        Some(Phase::Completed) => Ok(()),
        _ => bail!(
            "rollout {} {}: {}",
            spec.id,
            final_status.state.phase,
            final_status.state.reason.unwrap_or_default()
        ),
    }
}

async fn operate(json: bool, store: &Store, args: OperatorArgs, command: Operator) -> Result<()> {
    let loaded = controller::command(
        store,
        args.id.as_deref(),
        command,
        &format!("operator {}", who()),
        args.reason.as_deref(),
    )
    .await?;
    if json {
        outln!(
            "{}",
            serde_json::json!({"rollout": loaded.spec.id, "phase": loaded.state.phase, "revision": loaded.state_revision, "reason": loaded.state.reason})
        );
    } else {
        outln!(
            "rollout {} is {}{}",
            loaded.spec.id,
            loaded.state.phase,
            loaded
                .state
                .reason
                .map_or(String::new(), |r| format!(": {r}"))
        );
    }
    Ok(())
}

async fn history(json: bool, store: &Store) -> Result<()> {
    let all = controller::rollouts(store).await?;
    if json {
        let items: Vec<serde_json::Value> = all
            .iter()
            .map(|l| serde_json::json!({"spec": l.spec, "state": l.state}))
            .collect();
        outln!("{}", serde_json::json!({ "rollouts": items }));
        return Ok(());
    }
    if all.is_empty() {
        outln!("no rollouts");
    }
    for l in &all {
        outln!(
            "{}  {:<9}  {}  {} by {}{}",
            l.spec.id,
            l.state.phase.to_string(),
            l.spec.artifact.name,
            l.spec.step_name(l.state.step),
            l.spec.created_by,
            l.state
                .reason
                .as_ref()
                .map_or(String::new(), |r| format!("\n    {r}"))
        );
        for t in &l.state.transitions {
            outln!("    {} {} — {} ({})", fmt_ms(t.at_ms), t.phase, t.why, t.by);
        }
    }
    Ok(())
}

fn fmt_ms(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

async fn status(json: bool, store: &Store, id: Option<&str>, watch: bool) -> Result<()> {
    loop {
        let status = controller::status(store, id).await?;
        if json {
            outln!("{}", serde_json::to_string(&status)?);
        } else {
            if watch {
                // Clear the screen and go home: a redraw in place.
                print!("\x1b[2J\x1b[H");
            }
            print_status(&status);
        }
        if !watch || status.state.phase.is_final() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The terminal view of a rollout.
pub fn print_status(status: &RolloutStatus) {
    let spec = &status.spec;
    let state = &status.state;
    outln!(
        "rollout {}  {}  {} ({}), leader {}",
        spec.id,
        state.phase,
        spec.step_name(state.step),
        spec.selector.describe(),
        status.leader.as_deref().unwrap_or("none")
    );
    outln!(
        "patch {} sha256:{} {}",
        spec.artifact.name,
        spec.artifact.sha256.short(),
        spec.artifact
            .signature
            .as_ref()
            .map_or("unsigned".to_string(), |s| format!(
                "signed by {}",
                s.key_name
            ))
    );
    if let Some(reason) = &state.reason {
        outln!("reason: {reason}");
    }
    let t = &status.tally;
    outln!(
        "waves: {}",
        (0..spec.steps())
            .map(|s| {
                let mark = if s < state.step || state.phase == Phase::Completed {
                    "✓"
                } else if s == state.step {
                    "▶"
                } else {
                    " "
                };
                format!("{mark} {}", spec.step_name(s))
            })
            .collect::<Vec<_>>()
            .join("  ")
    );
    outln!(
        "{} selected: {} healthy, {} pending, {} failed, {} lost (budget {})",
        t.selected,
        t.healthy,
        t.pending,
        t.failed,
        t.lost,
        t.allowed
    );
    let mut by_state: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in &status.nodes {
        let standing = match (t.members.get(&row.name), &row.report) {
            (Some(Standing::Lost), _) => "lost".to_string(),
            (_, Some(r)) => r.state.to_string(),
            (_, None) if row.admitted => "pending".to_string(),
            _ => "not admitted".to_string(),
        };
        let cause = row
            .report
            .as_ref()
            .and_then(|r| r.processes.iter().find_map(|p| p.cause.clone()));
        by_state.entry(standing).or_default().push(match cause {
            Some(c) => format!("{} ({c})", row.name),
            None => row.name.clone(),
        });
    }
    for (standing, nodes) in by_state {
        outln!("  {standing:<12} {}", nodes.join(", "));
    }
}
