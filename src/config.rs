//! Configuration: a TOML file (`--config`), overridden by command-line flags, over defaults
//! sane for a laptop. `hermod serve --help` lists every setting; `docs/configuration.md`
//! explains them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use hermod_shards::cluster::{ClusterMap, NodeSpec};
use hermod_shards::remote::Tuning;
use hermod_shards::storage::Durability;
use serde::Deserialize;

use crate::nats::NatsConfig;
use crate::webhook::PushConfig;

/// Shortest admin token accepted: a guessable one would hand out every account.
const ADMIN_TOKEN_BYTES_MIN: usize = 16;
/// Shortest push webhook secret: the gateway trusts what it signs.
const PUSH_SECRET_BYTES_MIN: usize = 16;

/// Flags of `hermod serve`. Every one overrides the same key of the config file.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML config file; flags override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on (HTTP page at /, WebSocket at /ws). Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Data directory (RocksDB and the token secret). Created if missing.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Number of shards (one pinned core each). Default: the number of cores.
    #[arg(long, value_name = "N")]
    pub shards: Option<u16>,
    /// When a send is acked: fsync (WAL synced), wal (WAL written; survives a process crash), memory.
    #[arg(long, value_name = "MODE")]
    pub durability: Option<String>,
    /// Close a connection silent for this many ms.
    #[arg(long, value_name = "MS")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// Ping a connection silent for this many ms.
    #[arg(long, value_name = "MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Resend an unacked push after this many ms.
    #[arg(long, value_name = "MS")]
    pub push_retry_ms: Option<u64>,
    /// Requests per connection per second before `rate_limited` (10x that closes it).
    #[arg(long, value_name = "N")]
    pub rate_limit: Option<u32>,
    /// Let anyone pull anyone's presence (default: only friends and oneself).
    #[arg(long)]
    pub presence_public: bool,
    /// Largest group, in members (default 10000).
    #[arg(long, value_name = "N")]
    pub group_members_max: Option<usize>,
    /// Seconds after sending in which a sender may recall or edit a message (default 900).
    #[arg(long, value_name = "S")]
    pub edit_window_s: Option<u64>,
    /// Argon2id memory cost in KiB (default 19456, OWASP's minimum). Lower only for tests.
    #[arg(long, value_name = "KIB")]
    pub argon2_memory_kib: Option<u32>,
    /// Argon2id passes (default 2).
    #[arg(long, value_name = "N")]
    pub argon2_passes: Option<u32>,
    /// Serve the admin API (/admin/…) and the status pages on this address instead of the
    /// client port, e.g. 127.0.0.1:7401 (an operators' network). Port 0 picks one.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token for the admin API (/admin/…), at least 16 characters; without one the
    /// admin API is off. Prefer the env var or the file: flags show in `ps`.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "HERMOD_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Log filter (tracing EnvFilter syntax); the HERMOD_LOG env var overrides it.
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
}

/// The config file's shape; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data: Option<PathBuf>,
    shards: Option<u16>,
    durability: Option<String>,
    heartbeat_timeout_ms: Option<u64>,
    heartbeat_interval_ms: Option<u64>,
    push_retry_ms: Option<u64>,
    body_bytes_max: Option<usize>,
    rate_limit: Option<u32>,
    group_members_max: Option<usize>,
    edit_window_s: Option<u64>,
    presence_public: Option<bool>,
    token_ttl_s: Option<u64>,
    argon2_memory_kib: Option<u32>,
    argon2_passes: Option<u32>,
    admin_listen: Option<SocketAddr>,
    admin_token: Option<String>,
    log: Option<String>,
    cluster: Option<ClusterFile>,
    push: Option<PushFile>,
    media: Option<MediaFile>,
}

/// `[media]`: the media path (docs/media.md, "Settings"); every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MediaFile {
    dir: Option<PathBuf>,
    bytes_max: Option<u64>,
    quota_bytes: Option<u64>,
    chunk_max: Option<usize>,
    url_ttl_s: Option<u64>,
    upload_ttl_s: Option<u64>,
    gc_interval_s: Option<u64>,
    cores: Option<Vec<usize>>,
    direct_io: Option<bool>,
}

/// `[push]`: the offline-notification webhook (docs/admin.md, "Push webhook").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushFile {
    webhook_url: String,
    /// The HMAC key; the HERMOD_PUSH_SECRET environment variable overrides it (prefer that:
    /// this file is world-readable in the package).
    secret: Option<String>,
    coalesce_ms: Option<u64>,
    preview: Option<bool>,
    queue: Option<usize>,
    workers: Option<usize>,
    timeout_ms: Option<u64>,
    attempts: Option<u32>,
}

/// The `[cluster]` section: this node's id and the placement map (docs/cluster.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    node: String,
    #[serde(default = "first_version")]
    version: u64,
    nodes: Vec<NodeSpec>,
    /// Required with more than one node.
    nats: Option<NatsFile>,
    /// Each link's hello interval, and the silence after which a peer is down.
    hello_ms: Option<u64>,
    silent_ms: Option<u64>,
}

/// `[cluster.nats]`: where the NATS cluster is and how to log in.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NatsFile {
    urls: Vec<String>,
    user: Option<String>,
    password: Option<String>,
    /// A file holding an nkey seed (`SU…`), instead of user and password.
    nkey_seed_file: Option<PathBuf>,
    /// Require TLS to NATS; extra root certificates; a client certificate and its key (PEM).
    #[serde(default)]
    tls: bool,
    tls_ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    /// Longest wait for the first connection at start-up (default 5000).
    connect_timeout_ms: Option<u64>,
    /// Subjects are `<prefix>.<node id>` (default "hermod"): clusters sharing one NATS
    /// cluster use different prefixes.
    subject_prefix: Option<String>,
}

fn first_version() -> u64 {
    1
}

/// This node's place in a cluster.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub node: String,
    pub map: ClusterMap,
    /// `None` only for a one-node map.
    pub nats: Option<NatsConfig>,
    pub subject_prefix: String,
    pub tuning: Tuning,
}

impl Cluster {
    /// This node's shard count in the map (`node` was checked to be in it).
    pub fn shards(&self) -> u16 {
        self.map
            .nodes
            .iter()
            .find(|n| n.id == self.node)
            .map_or(0, |n| n.shards)
    }
}

/// The resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub shards: u16,
    pub durability: Durability,
    pub heartbeat_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub push_retry_ms: u64,
    pub body_bytes_max: usize,
    pub rate_limit: u32,
    pub group_members_max: usize,
    pub edit_window_s: u64,
    pub presence_public: bool,
    pub token_ttl_s: u64,
    pub argon2_memory_kib: u32,
    pub argon2_passes: u32,
    /// Where `/admin/…` is served instead of `listen`, if set.
    pub admin_listen: Option<SocketAddr>,
    /// The admin API's bearer token; `None`: the admin API is off.
    pub admin_token: Option<std::sync::Arc<str>>,
    pub log: String,
    /// `None`: a single node (the one-node map).
    pub cluster: Option<Cluster>,
    /// `None`: no push webhook, no offline notifications.
    pub push: Option<PushConfig>,
    pub media: crate::media::MediaConfig,
}

impl Config {
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Config> {
        let file: FileConfig = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u16;
        let cluster = file.cluster.map(resolve_cluster).transpose()?;
        let push = file.push.map(resolve_push).transpose()?;
        // A cluster node's shard count is the map's; a flag or key may only repeat it.
        let asked = args.shards.or(file.shards);
        let shards = match &cluster {
            Some(c) => {
                let own = c.shards();
                if asked.is_some_and(|n| n != own) {
                    bail!(
                        "shards = {}, but the cluster map gives node {:?} {own} shards",
                        asked.unwrap_or(own),
                        c.node
                    );
                }
                own
            }
            None => asked.unwrap_or(cores),
        };
        let durability = match args
            .durability
            .clone()
            .or(file.durability)
            .as_deref()
            .unwrap_or("wal")
        {
            "fsync" => Durability::Fsync,
            "wal" => Durability::Wal,
            "memory" => Durability::Memory,
            other => bail!("durability must be fsync, wal or memory, not {other:?}"),
        };
        let data = args
            .data
            .clone()
            .or(file.data)
            .unwrap_or_else(|| PathBuf::from("data"));
        let cfg = Config {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:7400".parse().expect("valid literal")),
            media: resolve_media(file.media.unwrap_or_default(), &data)?,
            data,
            shards,
            durability,
            heartbeat_timeout_ms: args
                .heartbeat_timeout_ms
                .or(file.heartbeat_timeout_ms)
                .unwrap_or(60_000),
            heartbeat_interval_ms: args
                .heartbeat_interval_ms
                .or(file.heartbeat_interval_ms)
                .unwrap_or(20_000),
            push_retry_ms: args.push_retry_ms.or(file.push_retry_ms).unwrap_or(5_000),
            rate_limit: args
                .rate_limit
                .or(file.rate_limit)
                .unwrap_or(hermod_shards::limits::REQUESTS_PER_SEC_MAX),
            group_members_max: args
                .group_members_max
                .or(file.group_members_max)
                .unwrap_or(hermod_shards::limits::GROUP_MEMBERS_MAX),
            edit_window_s: args
                .edit_window_s
                .or(file.edit_window_s)
                .unwrap_or(hermod_shards::limits::EDIT_WINDOW_MS / 1000),
            presence_public: args.presence_public || file.presence_public.unwrap_or(false),
            body_bytes_max: file
                .body_bytes_max
                .unwrap_or(hermod_shards::limits::BODY_BYTES_MAX),
            token_ttl_s: file.token_ttl_s.unwrap_or(30 * 24 * 3600),
            argon2_memory_kib: args
                .argon2_memory_kib
                .or(file.argon2_memory_kib)
                .unwrap_or(19 * 1024),
            argon2_passes: args.argon2_passes.or(file.argon2_passes).unwrap_or(2),
            admin_listen: args.admin_listen.or(file.admin_listen),
            admin_token: args
                .admin_token
                .clone()
                .or(file.admin_token)
                .map(|t| t.trim().into()),
            log: args
                .log
                .clone()
                .or(file.log)
                .unwrap_or_else(|| "info".into()),
            cluster,
            push,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// The placement map this node runs with, and its id in it.
    pub fn cluster_map(&self) -> (String, ClusterMap) {
        match &self.cluster {
            Some(c) => (c.node.clone(), c.map.clone()),
            None => ("local".into(), ClusterMap::single(self.shards)),
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        use hermod_shards::limits::{BODY_BYTES_MAX, GROUP_MEMBERS_LIMIT, SHARDS_MAX};
        if self.shards == 0 || self.shards as usize > SHARDS_MAX {
            bail!("shards must be 1..={SHARDS_MAX}");
        }
        if self.heartbeat_interval_ms >= self.heartbeat_timeout_ms {
            bail!("heartbeat_interval_ms must be below heartbeat_timeout_ms");
        }
        if self.push_retry_ms < 10 {
            bail!("push_retry_ms must be at least 10");
        }
        if self.rate_limit == 0 {
            bail!("rate_limit must be at least 1");
        }
        if self.body_bytes_max == 0 || self.body_bytes_max > BODY_BYTES_MAX {
            bail!("body_bytes_max must be 1..={BODY_BYTES_MAX}");
        }
        if !(2..=GROUP_MEMBERS_LIMIT).contains(&self.group_members_max) {
            bail!("group_members_max must be 2..={GROUP_MEMBERS_LIMIT}");
        }
        if self
            .admin_token
            .as_ref()
            .is_some_and(|t| t.len() < ADMIN_TOKEN_BYTES_MIN)
        {
            bail!("admin_token must be at least {ADMIN_TOKEN_BYTES_MIN} characters (generate one with `openssl rand -hex 32`)");
        }
        if self.argon2_memory_kib < 8 || self.argon2_passes == 0 {
            bail!("argon2_memory_kib must be >= 8 and argon2_passes >= 1");
        }
        Ok(())
    }
}

fn resolve_media(file: MediaFile, data: &Path) -> anyhow::Result<crate::media::MediaConfig> {
    let d = crate::media::MediaConfig::defaults(data);
    let cfg = crate::media::MediaConfig {
        dir: file.dir.unwrap_or(d.dir),
        bytes_max: file.bytes_max.unwrap_or(d.bytes_max),
        quota_bytes: file.quota_bytes.unwrap_or(d.quota_bytes),
        chunk_max: file.chunk_max.unwrap_or(d.chunk_max),
        url_ttl_s: file.url_ttl_s.unwrap_or(d.url_ttl_s),
        upload_ttl_s: file.upload_ttl_s.unwrap_or(d.upload_ttl_s),
        gc_interval_s: file.gc_interval_s.unwrap_or(d.gc_interval_s),
        cores: file.cores.unwrap_or_default(),
        direct_io: file.direct_io.unwrap_or(d.direct_io),
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(c) = cfg.cores.iter().find(|&&c| c >= 1024) {
        bail!("[media] cores: {c} is not a CPU number (this host has {cpus})");
    }
    if cfg.bytes_max == 0 || cfg.quota_bytes < cfg.bytes_max {
        bail!("[media] bytes_max must be at least 1 and quota_bytes at least bytes_max");
    }
    if !(1024..=crate::media::CHUNK_BYTES_LIMIT).contains(&cfg.chunk_max) {
        bail!(
            "[media] chunk_max must be 1024..={}",
            crate::media::CHUNK_BYTES_LIMIT
        );
    }
    if cfg.url_ttl_s == 0 || cfg.upload_ttl_s == 0 || cfg.gc_interval_s == 0 {
        bail!("[media] url_ttl_s, upload_ttl_s and gc_interval_s must be at least 1");
    }
    Ok(cfg)
}

fn resolve_push(file: PushFile) -> anyhow::Result<PushConfig> {
    let url = file.webhook_url;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("[push] webhook_url must be an http:// or https:// URL, not {url:?}");
    }
    let secret = std::env::var("HERMOD_PUSH_SECRET")
        .ok()
        .or(file.secret)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    if secret.len() < PUSH_SECRET_BYTES_MIN {
        bail!("[push] needs a secret of at least {PUSH_SECRET_BYTES_MIN} characters (HERMOD_PUSH_SECRET, or `secret`)");
    }
    let cfg = PushConfig {
        url,
        secret: secret.into_bytes().into(),
        coalesce_ms: file.coalesce_ms.unwrap_or(1_000),
        preview: file.preview.unwrap_or(false),
        queue: file.queue.unwrap_or(10_000),
        workers: file.workers.unwrap_or(4),
        timeout: std::time::Duration::from_millis(file.timeout_ms.unwrap_or(5_000)),
        attempts: file.attempts.unwrap_or(3),
    };
    if cfg.coalesce_ms > 60_000 {
        bail!("[push] coalesce_ms must be at most 60000");
    }
    if !(1..=1_000_000).contains(&cfg.queue) || !(1..=64).contains(&cfg.workers) {
        bail!("[push] queue must be 1..=1000000 and workers 1..=64");
    }
    if cfg.timeout.is_zero() || !(1..=10).contains(&cfg.attempts) {
        bail!("[push] timeout_ms must be at least 1 and attempts 1..=10");
    }
    Ok(cfg)
}

fn resolve_cluster(file: ClusterFile) -> anyhow::Result<Cluster> {
    let map = ClusterMap {
        version: file.version,
        nodes: file.nodes,
    };
    map.validate().context("[cluster]")?;
    map.node(&file.node).context("[cluster] node")?;
    let defaults = Tuning::default();
    let tuning = Tuning {
        hello_ms: file.hello_ms.unwrap_or(defaults.hello_ms),
        silent_ms: file.silent_ms.unwrap_or(defaults.silent_ms),
        ..defaults
    };
    if tuning.hello_ms == 0 || tuning.silent_ms < 2 * tuning.hello_ms {
        bail!("[cluster] hello_ms must be at least 1 and silent_ms at least twice hello_ms");
    }
    let mut subject_prefix = "hermod".to_owned();
    let nats = match file.nats {
        Some(n) => {
            if n.urls.is_empty() {
                bail!("[cluster.nats] urls must list at least one server");
            }
            if n.user.is_some() != n.password.is_some() {
                bail!("[cluster.nats] user and password go together");
            }
            if let Some(prefix) = n.subject_prefix {
                let ok = !prefix.is_empty()
                    && prefix.split('.').all(|t| {
                        !t.is_empty()
                            && t.chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    });
                if !ok {
                    bail!("[cluster.nats] subject_prefix {prefix:?} is not dot-separated tokens of a-z A-Z 0-9 - _");
                }
                subject_prefix = prefix;
            }
            if n.tls_cert_file.is_some() != n.tls_key_file.is_some() {
                bail!("[cluster.nats] tls_cert_file and tls_key_file go together");
            }
            let nkey_seed = match &n.nkey_seed_file {
                Some(path) => {
                    let seed = std::fs::read_to_string(path).with_context(|| {
                        format!("[cluster.nats] nkey_seed_file {}", path.display())
                    })?;
                    let seed = seed.trim().to_owned();
                    if !seed.starts_with("SU") {
                        bail!(
                            "[cluster.nats] {} does not hold a user nkey seed (SU…)",
                            path.display()
                        );
                    }
                    Some(seed)
                }
                None => None,
            };
            let tls = n.tls || n.tls_ca_file.is_some() || n.tls_cert_file.is_some();
            Some(NatsConfig {
                urls: n.urls,
                user: n.user,
                password: n.password,
                nkey_seed,
                tls,
                tls_ca: n.tls_ca_file,
                tls_client: n.tls_cert_file.zip(n.tls_key_file),
                name: format!("hermod-{}", file.node),
                connect_timeout: std::time::Duration::from_millis(
                    n.connect_timeout_ms.unwrap_or(5_000),
                ),
            })
        }
        None if map.nodes.len() > 1 => {
            bail!(
                "[cluster] lists {} nodes: a [cluster.nats] section must say where NATS is",
                map.nodes.len()
            )
        }
        None => None,
    };
    Ok(Cluster {
        node: file.node,
        map,
        nats,
        subject_prefix,
        tuning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_text(text: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hermod.toml");
        std::fs::write(&path, text).unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        Config::resolve(&args)
    }

    #[test]
    fn media_section_is_checked() {
        let cfg =
            resolve_text("[media]\nquota_bytes = 2000000\nbytes_max = 1000000\ncores = [1]\n")
                .unwrap();
        assert_eq!(
            (cfg.media.quota_bytes, cfg.media.cores.clone()),
            (2_000_000, vec![1])
        );
        assert!(
            cfg.media.dir.ends_with("media"),
            "under the data dir by default"
        );
        assert!(cfg.media.direct_io, "direct I/O by default");
        let cfg = resolve_text("[media]\ndirect_io = false\n").unwrap();
        assert!(!cfg.media.direct_io);
        for bad in [
            "bytes_max = 0",
            "quota_bytes = 10\nbytes_max = 20",
            "chunk_max = 10",
            "url_ttl_s = 0",
            "cores = [5000]",
            "direct_io = \"yes\"",
        ] {
            assert!(resolve_text(&format!("[media]\n{bad}\n")).is_err(), "{bad}");
        }
    }

    #[test]
    fn push_section_is_checked() {
        let ok = "[push]\nwebhook_url = \"https://gw.example/h\"\nsecret = \"0123456789abcdef\"\n";
        let cfg = resolve_text(ok).unwrap();
        let push = cfg.push.unwrap();
        assert_eq!(
            (push.coalesce_ms, push.preview, push.attempts),
            (1_000, false, 3)
        );
        for (bad, why) in [
            (
                "webhook_url = \"ftp://gw/h\"\nsecret = \"0123456789abcdef\"",
                "http",
            ),
            (
                "webhook_url = \"http://gw/h\"\nsecret = \"short\"",
                "secret",
            ),
            ("webhook_url = \"http://gw/h\"", "secret"),
            (
                "webhook_url = \"http://gw/h\"\nsecret = \"0123456789abcdef\"\nqueue = 0",
                "queue",
            ),
            (
                "webhook_url = \"http://gw/h\"\nsecret = \"0123456789abcdef\"\nattempts = 0",
                "attempts",
            ),
        ] {
            let e = resolve_text(&format!("[push]\n{bad}\n")).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{bad}: {e:#}");
        }
    }

    /// The shipped config files parse (unknown keys are refused) and pass the checks.
    #[test]
    fn shipped_config_files_are_valid() {
        for (name, text) in [
            (
                "docs/hermod.example.toml",
                include_str!("../docs/hermod.example.toml"),
            ),
            ("deploy/hermod.toml", include_str!("../deploy/hermod.toml")),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("hermod.toml");
            std::fs::write(&path, text).unwrap();
            #[derive(clap::Parser)]
            struct Cli {
                #[command(flatten)]
                serve: ServeArgs,
            }
            let cli =
                <Cli as clap::Parser>::parse_from(["serve", "--config", path.to_str().unwrap()]);
            let cfg = Config::resolve(&cli.serve).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!(cfg.durability, Durability::Fsync, "{name}");
        }
    }
}
