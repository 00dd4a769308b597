//! Start-up and shutdown: data dir, token secret, RocksDB, one SO_REUSEPORT listener and one
//! pinned glommio executor per shard, the mesh between them, and SIGINT/SIGTERM handling.

use std::fs;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};
use hermod_shards::auth::HashCost;
use hermod_shards::cluster::ClusterMap;
use hermod_shards::engine::{Config as EngineConfig, NotifyConfig};
use hermod_shards::remote::Remotes;
use hermod_shards::storage::Durability;
use hermod_shards::{Shard, ShardId};
use hermod_store::datadir;
use hermod_store::rocks::{self, RocksStorage};
use rand::RngCore;
use socket2::{Domain, Socket, Type};
use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::nats::{Bridge, Router};
use crate::shard::{self, LinkIo, Params, BLOCKING_THREADS};

/// Batches each channel between the NATS thread and a shard holds, either way.
const LINK_CHANNEL_BATCHES: usize = 1024;

/// glommio registers this much io memory per ring (3 rings per executor) and locks it; all
/// executors together must fit RLIMIT_MEMLOCK (often 8 MiB).
const IO_MEMORY_MAX: usize = 512 * 1024;
const IO_MEMORY_MIN: usize = 64 * 1024;

/// Submission entries of each executor's io_uring (glommio's default is 128). The kernel sizes
/// its table of armed polls from the ring (cq entries / 32 buckets, at most 256), and every
/// async cancel walks a bucket of it; glommio issues one per reactor turn, replacing its
/// preemption timer. With 128 entries that is 8 buckets for every idle connection's armed
/// read: 17% of a shard's CPU in `io_poll_find` with 5,000 connections (perf,
/// docs/benchmarks.md "Ceilings"). 4,096 gives 256 buckets.
const RING_DEPTH: usize = 4096;

/// Threads of the media path's worker pool (file I/O and hashing under SCHED_IDLE).
const MEDIA_WORKERS: usize = 4;
pub fn run(cfg: Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env("HERMOD_LOG")
        .or_else(|_| EnvFilter::try_new(&cfg.log))
        .context("log filter")?;
    // try_init also routes the `log` records of glommio into tracing.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();

    fs::create_dir_all(&cfg.data)
        .with_context(|| format!("creating data dir {}", cfg.data.display()))?;
    let secret = datadir::load_or_create_secret(&cfg.data)
        .with_context(|| format!("token secret in {}", cfg.data.display()))?;
    let db = rocks::open(&datadir::db_path(&cfg.data), cfg.shards)?;
    let (node, map) = cfg.cluster_map();
    datadir::check_identity(&cfg.data, &node, map.hash())?;

    let (placeholder, addr) = reserve(cfg.listen)?;
    let admin = cfg.admin_listen.map(reserve).transpose()?;
    let admin_addr = admin.as_ref().map(|(_, a)| *a);
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let io_memory = io_memory_per_executor(cfg.shards as usize)?;
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, shutdown.clone())
            .context("installing signal handlers")?;
    }

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut meshes = crate::mesh::build(cfg.shards as usize);
    let node_index = map.node(&node)?;
    let first = map.shards_of(node_index).start;
    let peers: Vec<u16> = (0..map.placement().shards())
        .filter(|&s| !map.shards_of(node_index).contains(&s))
        .collect();
    let board = crate::metrics::Board::with_peers(cfg.shards as usize, &peers);
    // A process's incarnation: its start time in µs, larger in every later life.
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64);
    let tuning = cfg.cluster.as_ref().map(|c| c.tuning).unwrap_or_default();
    let (bridge, mut link_ios) = start_bridge(&cfg, &map, node_index)?;
    let pusher = cfg
        .push
        .as_ref()
        .map(|push| crate::webhook::Pusher::start(push, board.clone()))
        .transpose()
        .context("starting the push webhook's workers")?;
    let bot_hooks = crate::webhook::BotHooks::start(board.clone())
        .context("starting the bots' webhook workers")?;
    let media_store = crate::media::FsStore::open(&cfg.media.dir, cfg.media.direct_io)
        .with_context(|| format!("opening the media store at {}", cfg.media.dir.display()))?;
    let media = Arc::new(crate::media::Media {
        cfg: cfg.media.clone(),
        store: Arc::new(media_store),
        key: hermod_shards::auth::TokenKey::new(&secret),
        stats: board.media.clone(),
        workers: crate::media::Workers::start(MEDIA_WORKERS, &cfg.media.cores)
            .context("starting the media workers")?,
    });
    let map = Arc::new(map);
    let mut handles = Vec::new();
    for i in (0..cfg.shards as usize).rev() {
        let mesh = meshes.pop().expect("one mesh end per shard");
        let id = ShardId(first + i as u16);
        let link_io = link_ios.pop().flatten();
        let remotes = Remotes::new(&map, node_index, id, incarnation, tuning);
        let mut engine_cfg = EngineConfig::in_cluster(id, map.clone(), node_index, secret);
        engine_cfg.heartbeat_timeout_ms = cfg.heartbeat_timeout_ms;
        engine_cfg.heartbeat_interval_ms = cfg.heartbeat_interval_ms;
        engine_cfg.push_retry_ms = cfg.push_retry_ms;
        engine_cfg.body_bytes_max = cfg.body_bytes_max;
        engine_cfg.requests_per_sec_max = cfg.rate_limit;
        engine_cfg.token_ttl_s = cfg.token_ttl_s;
        engine_cfg.group_members_max = cfg.group_members_max;
        engine_cfg.presence_public = cfg.presence_public;
        engine_cfg.edit_window_ms = cfg.edit_window_s.saturating_mul(1000);
        engine_cfg.hash_cost = HashCost {
            memory_kib: cfg.argon2_memory_kib,
            passes: cfg.argon2_passes,
        };
        engine_cfg.seed = rand::rngs::OsRng.next_u64();
        engine_cfg.media_bytes_max = cfg.media.bytes_max;
        engine_cfg.media_quota_bytes = cfg.media.quota_bytes;
        engine_cfg.notify = cfg.push.as_ref().map(|p| NotifyConfig {
            coalesce_ms: p.coalesce_ms,
            preview: p.preview,
        });
        let store = RocksStorage::new(db.clone(), i as u16);
        let durability: Durability = cfg.durability;
        let shutdown = shutdown.clone();
        let bound = bound_tx.clone();
        let hash_cost = engine_cfg.hash_cost;
        let board = board.clone();
        let admin_token = cfg.admin_token.clone();
        let pusher = pusher.clone();
        let bot_hooks = bot_hooks.clone();
        let media = Some(media.clone());
        let handle = LocalExecutorBuilder::new(Placement::Fixed(i % cores))
            .name(&format!("hermod-shard-{i}"))
            .io_memory(io_memory)
            .ring_depth(RING_DEPTH)
            .blocking_thread_pool_placement(PoolPlacement::Unbound(BLOCKING_THREADS))
            .spawn(move || async move {
                let engine = Shard::new(engine_cfg, store.clone());
                shard::run(Params {
                    engine,
                    local: i,
                    remotes,
                    link_io,
                    store,
                    durability,
                    hash_cost,
                    listen: addr,
                    admin_listen: admin_addr,
                    bound,
                    mesh,
                    shutdown,
                    board,
                    admin_token,
                    pusher,
                    bot_hooks,
                    media,
                })
                .await
            })
            .map_err(|e| anyhow::anyhow!("starting shard {i}: {e}"))?;
        handles.push(handle);
    }
    for _ in 0..cfg.shards {
        match bound_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!("a shard stopped during start-up"),
        }
    }
    drop(placeholder);
    drop(admin);
    let admin_note = admin_addr
        .map(|a| format!(", admin on http://{a}"))
        .unwrap_or_default();
    println!(
        "hermod listening on http://{addr} (shards {}, durability {:?}, data {}{admin_note})",
        cfg.shards,
        cfg.durability,
        cfg.data.display()
    );
    std::io::stdout().flush().ok();
    tracing::info!(%addr, shards = cfg.shards, "started");

    let mut failed = false;
    for handle in handles {
        if handle.join().is_err() {
            failed = true;
        }
    }
    drop(bridge);
    drop(db);
    if failed {
        bail!("a shard stopped with an error");
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Connects to NATS when the cluster has other nodes: one bridge for the process, subscribed
/// to this node's subject, routing each batch to its shard. Returns each shard's ends (by
/// local index), or `None`s on a single node.
fn start_bridge(
    cfg: &Config,
    map: &ClusterMap,
    node: usize,
) -> anyhow::Result<(Option<Bridge>, Vec<Option<LinkIo>>)> {
    let shards = cfg.shards as usize;
    let Some(cluster) = cfg.cluster.as_ref().filter(|_| map.nodes.len() > 1) else {
        return Ok((None, (0..shards).map(|_| None).collect()));
    };
    let nats = cluster
        .nats
        .clone()
        .context("a cluster of several nodes needs [cluster.nats]")?;
    let subjects: Vec<String> = map
        .nodes
        .iter()
        .map(|n| format!("{}.{}", cluster.subject_prefix, n.id))
        .collect();
    let first = map.shards_of(node).start;
    let (routes, inboxes): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| async_channel::bounded::<Vec<u8>>(LINK_CHANNEL_BATCHES))
        .unzip();
    // A message holds batches for shards of this node: each goes to its shard's channel.
    let router: Router = Box::new(move |message| {
        let Ok(batches) = hermod_shards::remote::message_batches(message) else {
            return Vec::new();
        };
        batches
            .into_iter()
            .filter_map(|(to, range)| {
                let local = to.0.checked_sub(first)? as usize;
                (local < shards).then_some((local, range))
            })
            .collect()
    });
    let bridge = Bridge::start_routed(
        nats,
        vec![subjects[node].clone()],
        LINK_CHANNEL_BATCHES,
        routes,
        router,
    )
    .context("linking to the other nodes through NATS")?;
    tracing::info!(subject = %subjects[node], nodes = map.nodes.len(), "connected to NATS");
    let ios = inboxes
        .into_iter()
        .map(|inbox| {
            Some(LinkIo {
                inbox,
                out: bridge.out.clone(),
                subjects: subjects.clone(),
            })
        })
        .collect();
    Ok((Some(bridge), ios))
}

/// Picks the port when the configured one is 0: binds (without listening, so it never takes a
/// connection) with SO_REUSEPORT, and is kept until every shard has bound the same address.
fn reserve(addr: std::net::SocketAddr) -> anyhow::Result<(Socket, std::net::SocketAddr)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    let addr = socket
        .local_addr()?
        .as_socket()
        .context("listener address")?;
    Ok((socket, addr))
}

fn io_memory_per_executor(shards: usize) -> anyhow::Result<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let locked = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        8 << 20
    };
    // Keep 1 MiB of headroom for everything else that locks memory.
    let per = locked.saturating_sub(1 << 20) / (3 * shards);
    let per = per.min(IO_MEMORY_MAX) / 4096 * 4096;
    if per < IO_MEMORY_MIN {
        bail!(
            "locked-memory limit ({} KiB) is too small for {shards} shards; raise `ulimit -l` or use fewer shards (see tuning.md)",
            locked / 1024
        );
    }
    Ok(per)
}
