//! The media path (docs/media.md): resumable chunked uploads over HTTP on the client port,
//! content-addressed storage with deduplication by SHA-256 (a proof of possession required),
//! and range reads behind capability URLs. Owns the `[media]` settings, the [`MediaStore`]
//! trait and its file-system implementation [`FsStore`], the HTTP handlers, the collection of
//! abandoned uploads, and the media counters in `/metrics`.
//!
//! Every file-system call (writes, fsyncs, hashing, reads) runs on the media path's own worker
//! threads ([`Workers`]), never on a shard's reactor nor in the blocking pool that carries the
//! message path's commits; the workers run under `SCHED_IDLE`, so hashing and copying bulk
//! bytes use only what the shards leave of a core. Uploads are files any shard may
//! touch (a client's requests land on whichever shard accepts them), so an append or a
//! completion holds an `flock` on the upload's file — on the worker — which makes "append at
//! the stored offset" atomic.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use glommio::net::TcpStream;
use hermod_shards::auth::TokenKey;
use hermod_shards::media::{capability, check_capability, Grant};
use hermod_shards::UserId;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::ctx::{now_ms, Ctx};
use crate::http;

/// The `[media]` settings (docs/media.md, "Settings").
#[derive(Clone, Debug)]
pub struct MediaConfig {
    pub dir: PathBuf,
    pub bytes_max: u64,
    pub quota_bytes: u64,
    /// Largest `PATCH` body.
    pub chunk_max: usize,
    pub url_ttl_s: u64,
    /// An upload not completed this long after its creation is collected.
    pub upload_ttl_s: u64,
    pub gc_interval_s: u64,
    /// CPUs the media threads run on (empty: wherever the process may run). Cores no shard
    /// uses keep bulk bytes off the shards' cores entirely.
    pub cores: Vec<usize>,
    /// Upload bytes written and hashed with `O_DIRECT` (see "direct I/O" below).
    pub direct_io: bool,
}

/// Hard ceiling of `chunk_max` (the HTTP layer refuses larger bodies before reading them).
pub const CHUNK_BYTES_LIMIT: usize = 8 * 1024 * 1024;

/// Bytes read from the store per write to a downloading socket.
const READ_PIECE: u64 = 256 * 1024;

/// Media bodies being read at once on one shard (each buffered whole, up to `chunk_max`);
/// past it a request gets `503`.
pub const BODIES_IN_FLIGHT_MAX: usize = 64;

impl MediaConfig {
    pub fn defaults(data: &Path) -> MediaConfig {
        MediaConfig {
            dir: data.join("media"),
            bytes_max: hermod_shards::limits::MEDIA_BYTES_MAX,
            quota_bytes: hermod_shards::limits::MEDIA_QUOTA_BYTES,
            chunk_max: 1024 * 1024,
            url_ttl_s: 30 * 24 * 3600,
            upload_ttl_s: 24 * 3600,
            gc_interval_s: 600,
            cores: Vec::new(),
            direct_io: true,
        }
    }
}

/// Process-wide media figures for `/metrics`.
#[derive(Default)]
pub struct MediaStats {
    pub uploads_completed: AtomicU64,
    pub uploads_refused: AtomicU64,
    pub dedup_hits: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub collected: AtomicU64,
    pub expired: AtomicU64,
    pub deleted: AtomicU64,
    /// Bytes of stored content (blobs), as of the last collection pass.
    pub store_bytes: AtomicU64,
}

impl MediaStats {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, kind, help, cell) in [
            ("hermod_media_uploads_completed_total", "counter", "Uploads completed (deduplicated ones included).", &self.uploads_completed),
            ("hermod_media_uploads_refused_total", "counter", "Completions refused: a hash other than the granted one, or a wrong deduplication proof.", &self.uploads_refused),
            ("hermod_media_dedup_total", "counter", "Uploads completed without their bytes: the content was stored already.", &self.dedup_hits),
            ("hermod_media_bytes_in_total", "counter", "Upload bytes stored.", &self.bytes_in),
            ("hermod_media_bytes_out_total", "counter", "Media bytes sent to readers.", &self.bytes_out),
            ("hermod_media_collected_total", "counter", "Uploads collected unfinished after upload_ttl_s.", &self.collected),
            ("hermod_media_expired_total", "counter", "Media collected once every URL to them had expired (url_ttl_s after completion).", &self.expired),
            ("hermod_media_deleted_total", "counter", "Media deleted by their uploaders (media_delete).", &self.deleted),
            ("hermod_media_store_bytes", "gauge", "Bytes of stored media content, as of the last collection pass.", &self.store_bytes),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", cell.load(Ordering::Relaxed));
        }
    }
}

// ---- the store ----

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("no such upload or medium")]
    NotFound,
    #[error("the upload is at offset {0}")]
    Offset(u64),
    #[error("past the upload's announced size")]
    TooLarge,
    #[error("the content's SHA-256 is not the announced one")]
    HashMismatch,
    #[error("the deduplication proof is wrong")]
    BadProof,
    #[error("a proof is required (the content is stored already)")]
    ProofRequired,
    #[error("the media workers are busy")]
    Busy,
    #[error("only its uploader deletes a medium")]
    Forbidden,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A new upload: a fresh one (send the bytes) or a deduplication (prove possession).
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    Fresh { upload: String },
    Dedup { upload: String, nonce: String },
}

/// A stored medium.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MediaMeta {
    pub sha256: String,
    pub size: u64,
    pub mime: String,
    pub created_ms: u64,
    /// The uploader (their quota holds its size until it is collected).
    #[serde(default)]
    pub user: u64,
}

/// Where media bytes live. Every method blocks: call them on the media workers. The file
/// system one is [`FsStore`]; an object store for larger deployments implements the same.
pub trait MediaStore: Send + Sync + 'static {
    fn create(&self, grant: &Grant, now_ms: u64) -> Result<Created, MediaError>;
    /// The stored length and the announced size of an upload.
    fn status(&self, upload: &str) -> Result<(u64, u64), MediaError>;
    /// Appends `bytes` if the upload's stored length is `offset`; the new length.
    fn append(&self, upload: &str, offset: u64, bytes: &[u8]) -> Result<u64, MediaError>;
    /// Verifies and stores the upload as a new medium: its id and meta, and whether it was a
    /// deduplication.
    fn complete(
        &self,
        upload: &str,
        proof: Option<&str>,
        now_ms: u64,
    ) -> Result<(String, MediaMeta, bool), MediaError>;
    fn meta(&self, media: &str) -> Result<MediaMeta, MediaError>;
    /// Drops medium `media` if `user` uploaded it (`Forbidden` otherwise): its URLs stop
    /// reading at once; its content goes with the next collection unless another medium
    /// shares it. Its meta, whose size goes back to the quota.
    fn delete(&self, media: &str, user: UserId) -> Result<MediaMeta, MediaError>;
    fn read(&self, meta: &MediaMeta, offset: u64, len: u64) -> Result<Vec<u8>, MediaError>;
    /// Drops uploads created before `uploads_before_ms` and never completed, media completed
    /// before `media_before_ms` (every URL to them has expired: nobody can read them), and
    /// content no medium or upload refers to any more.
    fn collect(
        &self,
        uploads_before_ms: u64,
        media_before_ms: u64,
    ) -> Result<Collected, MediaError>;
}

/// What one collection pass dropped, and what is left.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Uploads dropped unfinished: their users and sizes (back to the quota).
    pub uploads: Vec<(UserId, u64)>,
    /// Media dropped after their URLs expired: their uploaders and sizes (back to the quota).
    pub media: Vec<(UserId, u64)>,
    /// Bytes of stored content after the pass.
    pub bytes: u64,
}

/// Ids of uploads and media: 128 random bits, as 32 lower-case hex digits. Anything else in
/// a path is refused before it reaches the file system.
fn new_id() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    hex(&b)
}

pub use hermod_shards::media::valid_media_id as valid_id;

/// Removes `path`: `false` if it was not there (someone else removed it first — a deletion and
/// a collection racing — so only one of them gives its size back).
fn remove_if_there(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Serialize, Deserialize)]
struct UploadMeta {
    user: u64,
    size: u64,
    sha256: String,
    mime: String,
    created_ms: u64,
    /// Set for a deduplication: the proof is SHA-256(nonce ‖ content).
    nonce: Option<String>,
}

/// Media on the node's disk, content-addressed:
/// `uploads/<id>.json` + `uploads/<id>.part` (an upload under way), `blobs/<aa>/<sha256>`
/// (content, once per hash), `media/<id>.json` (a medium: its hash, size, type).
pub struct FsStore {
    root: PathBuf,
    /// Upload bytes bypass the page cache (`[media] direct_io`).
    direct_io: bool,
    /// Uploads hashed as their chunks are stored: upload id → (bytes hashed, hash so far).
    /// Memory only: after a restart, or for an upload not tracked (the table was full), the
    /// completion reads the file back instead. Locked briefly by the media workers (never a
    /// reactor); the hashing itself happens with the entry taken out.
    hashing: std::sync::Mutex<std::collections::HashMap<String, (u64, Sha256)>>,
}

/// Uploads hashed incrementally at once at most (~200 bytes each); past it new uploads are
/// hashed at completion instead.
const HASHING_MAX: usize = 4096;

impl FsStore {
    pub fn open(root: &Path, direct_io: bool) -> io::Result<FsStore> {
        for sub in ["uploads", "blobs", "media"] {
            fs::create_dir_all(root.join(sub))?;
        }
        Ok(FsStore {
            root: root.to_owned(),
            direct_io,
            hashing: std::sync::Mutex::default(),
        })
    }

    /// The running hash of `upload` if it covers exactly its first `len` bytes (taken out of
    /// the table: the caller holds the upload's lock, and puts it back with `keep_hashing`).
    fn take_hashing(&self, upload: &str, len: u64) -> Option<Sha256> {
        let mut table = self.hashing.lock().unwrap_or_else(|p| p.into_inner());
        match table.remove(upload) {
            Some((hashed, h)) if hashed == len => Some(h),
            Some(_) => None,
            None if len == 0 && table.len() < HASHING_MAX => Some(Sha256::new()),
            None => None,
        }
    }

    fn keep_hashing(&self, upload: &str, hashed: u64, h: Sha256) {
        let mut table = self.hashing.lock().unwrap_or_else(|p| p.into_inner());
        table.insert(upload.to_owned(), (hashed, h));
    }

    fn forget_hashing(&self, upload: &str) {
        let mut table = self.hashing.lock().unwrap_or_else(|p| p.into_inner());
        table.remove(upload);
    }

    fn upload_meta_path(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(format!("{id}.json"))
    }

    fn part_path(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(format!("{id}.part"))
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(&sha256[..2]).join(sha256)
    }

    fn media_path(&self, id: &str) -> PathBuf {
        self.root.join("media").join(format!("{id}.json"))
    }

    fn upload(&self, id: &str) -> Result<UploadMeta, MediaError> {
        read_record(id, |id| self.upload_meta_path(id))
    }

    /// The part file, opened for appending and locked (released when the file is closed).
    fn locked_part(&self, id: &str) -> Result<File, MediaError> {
        let file = match OpenOptions::new()
            .append(true)
            .read(true)
            .open(self.part_path(id))
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(MediaError::NotFound),
            Err(e) => return Err(e.into()),
        };
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(file)
    }
}

/// The JSON record of `id` at `path(id)`: `NotFound` for an id that is not one (so nothing
/// else ever reaches the file system) or a record that is not there.
fn read_record<T: serde::de::DeserializeOwned>(
    id: &str,
    path: impl Fn(&str) -> PathBuf,
) -> Result<T, MediaError> {
    if !valid_id(id) {
        return Err(MediaError::NotFound);
    }
    match fs::read(path(id)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| io::Error::other(e).into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(MediaError::NotFound),
        Err(e) => Err(e.into()),
    }
}

/// The `<id>.json` records in `dir` (an upload's or a medium's), with their paths; other
/// files (a `.part`, a `.tmp` left by a crash) are not records.
fn records(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .filter(|id| valid_id(id))
            .map(str::to_owned);
        if let Some(id) = id {
            out.push((id, path));
        }
    }
    Ok(out)
}

/// Writes `bytes` to `path` atomically and durably: a temporary file, fsynced, renamed over
/// it, and the directory fsynced.
fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

// ---- direct I/O ----
//
// Upload bytes are written once and read back once (the hash at completion), so passing them
// through the page cache only evicts pages the message store wants, and allocates fresh
// memory at the upload's rate. Fresh memory is not free: on VMs whose guest hands free pages
// back to the host (free page reporting, ballooning — the machines `bench/` runs on), the
// first touch of each page stalls the CPU in the host, where no guest scheduler can preempt
// it for a shard; a 100 MB/s buffered upload raised the one-to-one p99 on the shard's core
// there from 3.4 to 5.5 ms (docs/benchmarks.md). So whole blocks go by `O_DIRECT` from a buffer each worker keeps
// for its life, and only a chunk's last partial block (under 4 KiB) is written buffered.
// Downloads stay buffered: content just sent is about to be fetched by its readers, which is
// what the page cache is for. A file system without `O_DIRECT` (open answers `EINVAL`), or a
// device whose blocks are larger than `DIRECT_ALIGN` (the direct write or read answers
// `EINVAL`, before moving any byte), gets buffered I/O.

/// Alignment of `O_DIRECT` offsets, lengths and buffers: the largest logical block size in
/// common use, so it suits every device and file system that takes `O_DIRECT`.
const DIRECT_ALIGN: usize = 4096;

/// Bytes per read when hashing a file.
const HASH_PIECE: usize = 1024 * 1024;

/// A worker's buffer for direct I/O. It only grows (to the largest chunk seen) and lives as
/// long as its thread, so bulk bytes reuse the same memory.
#[derive(Default)]
struct AlignedBuf {
    raw: Vec<u8>,
}

impl AlignedBuf {
    /// `len` bytes starting at a `DIRECT_ALIGN`-aligned address.
    fn get(&mut self, len: usize) -> &mut [u8] {
        let need = len + DIRECT_ALIGN;
        if self.raw.len() < need {
            self.raw = vec![0; need.next_multiple_of(HASH_PIECE)];
        }
        let at = self.raw.as_ptr().align_offset(DIRECT_ALIGN);
        &mut self.raw[at..at + len]
    }
}

thread_local! {
    static DIRECT_BUF: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::default();
}

/// How a chunk reached the file (tests check that the direct path is the one taken).
#[derive(Debug, PartialEq, Eq)]
enum Written {
    /// Whole blocks by `O_DIRECT`, the partial last block (if any) buffered.
    Direct,
    /// Buffered: the chunk lies within one block, or the file system has no `O_DIRECT`.
    Buffered,
}

/// `path` opened with `O_DIRECT` (and `write` or read), or `None` if its file system does not
/// support it.
fn open_direct(path: &Path, write: bool) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Appends `bytes` to `part` (opened for appending, locked, `len` bytes long), bypassing the
/// page cache where it can: the block holding the old tail is read back and written again with
/// the chunk's first bytes so that every direct write starts and ends on a block boundary,
/// and the chunk's partial last block is appended buffered. A crash between the two writes
/// leaves a correct prefix of the upload, which `HEAD` reports and the client resumes from.
fn append_direct(part: &mut File, path: &Path, len: u64, bytes: &[u8]) -> io::Result<Written> {
    use std::os::unix::fs::FileExt;
    let start = len - len % DIRECT_ALIGN as u64;
    let head = (len - start) as usize;
    let whole = (head + bytes.len()) / DIRECT_ALIGN * DIRECT_ALIGN;
    let direct = if whole > 0 {
        open_direct(path, true)?
    } else {
        None
    };
    let Some(direct) = direct else {
        part.write_all(bytes)?;
        return Ok(Written::Buffered);
    };
    let sent = whole - head;
    let written = DIRECT_BUF.with_borrow_mut(|buf| {
        let buf = buf.get(whole);
        part.read_exact_at(&mut buf[..head], start)?;
        buf[head..].copy_from_slice(&bytes[..sent]);
        direct.write_all_at(buf, start)
    });
    match written {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            part.write_all(bytes)?;
            return Ok(Written::Buffered);
        }
        Err(e) => return Err(e),
    }
    // `part` appends at the end of the file, which the direct write moved to start + whole.
    part.write_all(&bytes[sent..])?;
    Ok(Written::Direct)
}

/// SHA-256 of `prefix ‖ the file at path`, read by `O_DIRECT` into the worker's buffer if
/// `direct` and the file system allows.
fn sha256_file(path: &Path, prefix: &[u8], direct: bool) -> io::Result<String> {
    let file = if direct {
        open_direct(path, false)?
    } else {
        None
    };
    let Some(mut file) = file else {
        return sha256_of(File::open(path)?, prefix);
    };
    let hashed: io::Result<String> = DIRECT_BUF.with_borrow_mut(|buf| {
        let buf = buf.get(HASH_PIECE);
        let mut h = Sha256::new();
        h.update(prefix);
        // Each read but the last (short, at the end of the file) is whole pieces, so the file
        // position stays aligned as O_DIRECT requires.
        loop {
            let n = file.read(buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex(&h.finalize()))
    });
    match hashed {
        // Refused at the first read (alignment is the same for every piece): read it buffered.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => sha256_of(File::open(path)?, prefix),
        other => other,
    }
}

fn sha256_of(mut reader: impl Read, prefix: &[u8]) -> io::Result<String> {
    let mut h = Sha256::new();
    h.update(prefix);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

impl MediaStore for FsStore {
    fn create(&self, grant: &Grant, now_ms: u64) -> Result<Created, MediaError> {
        let sha256 = hex(&grant.sha256);
        let id = new_id();
        let dedup = self.blob_path(&sha256).exists();
        let nonce = dedup.then(new_id);
        let meta = UploadMeta {
            user: grant.user.0,
            size: grant.size,
            sha256,
            mime: grant.mime.clone(),
            created_ms: now_ms,
            nonce: nonce.clone(),
        };
        if !dedup {
            File::create(self.part_path(&id))?.sync_all()?;
        }
        let bytes = serde_json::to_vec(&meta).map_err(io::Error::other)?;
        write_durably(&self.upload_meta_path(&id), &bytes)?;
        Ok(match nonce {
            Some(nonce) => Created::Dedup { upload: id, nonce },
            None => Created::Fresh { upload: id },
        })
    }

    fn status(&self, upload: &str) -> Result<(u64, u64), MediaError> {
        let meta = self.upload(upload)?;
        let len = match fs::metadata(self.part_path(upload)) {
            Ok(m) => m.len(),
            Err(_) => 0,
        };
        Ok((len, meta.size))
    }

    fn append(&self, upload: &str, offset: u64, bytes: &[u8]) -> Result<u64, MediaError> {
        let meta = self.upload(upload)?;
        let mut part = self.locked_part(upload)?;
        let len = part.metadata()?.len();
        if len != offset {
            return Err(MediaError::Offset(len));
        }
        if len + bytes.len() as u64 > meta.size {
            return Err(MediaError::TooLarge);
        }
        // Not fsynced per chunk: a process crash loses nothing written, and after a host crash
        // the file holds a prefix of what was acknowledged (ext4's ordered data never exposes
        // unwritten blocks), which `HEAD` reports and the client resumes from. Completion
        // fsyncs the whole file and checks its hash, so no wrong byte becomes a medium.
        // (An fsync per chunk stalled the message path's WAL writes on the same disk.)
        // The hash runs as the bytes are stored, so the completion need not read them back. It
        // is taken out before the write and put back only after a whole one: a failed write
        // leaves the upload untracked (hashed from the file at completion).
        let hashing = self.take_hashing(upload, len);
        if self.direct_io {
            append_direct(&mut part, &self.part_path(upload), len, bytes)?;
        } else {
            part.write_all(bytes)?;
        }
        let end = len + bytes.len() as u64;
        if let Some(mut h) = hashing {
            h.update(bytes);
            self.keep_hashing(upload, end, h);
        }
        Ok(end)
    }

    fn complete(
        &self,
        upload: &str,
        proof: Option<&str>,
        now_ms: u64,
    ) -> Result<(String, MediaMeta, bool), MediaError> {
        let meta = self.upload(upload)?;
        let blob = self.blob_path(&meta.sha256);
        let dedup = meta.nonce.is_some();
        if let Some(nonce) = &meta.nonce {
            let proof = proof.ok_or(MediaError::ProofRequired)?;
            let want = sha256_file(&blob, nonce.as_bytes(), self.direct_io)?;
            if !bool::from(subtle::ConstantTimeEq::ct_eq(
                want.as_bytes(),
                proof.as_bytes(),
            )) {
                fs::remove_file(self.upload_meta_path(upload))?;
                return Err(MediaError::BadProof);
            }
        } else {
            match self.locked_part(upload) {
                Ok(part) => {
                    let len = part.metadata()?.len();
                    if len != meta.size {
                        return Err(MediaError::Offset(len));
                    }
                    part.sync_all()?;
                    let hashed = match self.take_hashing(upload, len) {
                        Some(h) if len > 0 => hex(&h.finalize()),
                        // Not tracked (a restart, a full table): read it back, through another
                        // descriptor; `part` keeps the lock meanwhile.
                        _ => sha256_file(&self.part_path(upload), b"", self.direct_io)?,
                    };
                    if hashed != meta.sha256 {
                        fs::remove_file(self.part_path(upload))?;
                        fs::remove_file(self.upload_meta_path(upload))?;
                        return Err(MediaError::HashMismatch);
                    }
                    fs::create_dir_all(blob.parent().expect("blobs have a directory"))?;
                    if blob.exists() {
                        fs::remove_file(self.part_path(upload))?; // stored meanwhile
                    } else {
                        fs::rename(self.part_path(upload), &blob)?;
                        sync_dir(&blob)?;
                    }
                }
                // A crash after the rename, before the medium was written: the content is in
                // place under its hash (which is its name), so the check already passed.
                Err(MediaError::NotFound) if blob.exists() => {}
                Err(e) => return Err(e),
            }
        }
        let media = MediaMeta {
            sha256: meta.sha256,
            size: meta.size,
            mime: meta.mime,
            created_ms: now_ms,
            user: meta.user,
        };
        let id = new_id();
        let bytes = serde_json::to_vec(&media).map_err(io::Error::other)?;
        write_durably(&self.media_path(&id), &bytes)?;
        fs::remove_file(self.upload_meta_path(upload))?;
        Ok((id, media, dedup))
    }

    fn meta(&self, media: &str) -> Result<MediaMeta, MediaError> {
        read_record(media, |id| self.media_path(id))
    }

    fn delete(&self, media: &str, user: UserId) -> Result<MediaMeta, MediaError> {
        let meta = self.meta(media)?;
        if meta.user != user.0 {
            return Err(MediaError::Forbidden);
        }
        if !remove_if_there(&self.media_path(media))? {
            return Err(MediaError::NotFound);
        }
        Ok(meta)
    }

    fn read(&self, meta: &MediaMeta, offset: u64, len: u64) -> Result<Vec<u8>, MediaError> {
        let mut f = File::open(self.blob_path(&meta.sha256))?;
        f.seek(SeekFrom::Start(offset))?;
        let mut out = Vec::with_capacity(len as usize);
        f.take(len).read_to_end(&mut out)?;
        Ok(out)
    }

    fn collect(
        &self,
        uploads_before_ms: u64,
        media_before_ms: u64,
    ) -> Result<Collected, MediaError> {
        let mut out = Collected::default();
        // Content an upload (finished meanwhile or not) or a live medium names is kept. The
        // uploads are listed first: a completion writes its medium before it drops its upload,
        // so content being completed during this pass is seen in one list or the other.
        let mut kept = std::collections::HashSet::new();
        for (id, path) in records(&self.root.join("uploads"))? {
            let Ok(meta) = self.upload(&id) else { continue };
            if meta.created_ms < uploads_before_ms {
                self.forget_hashing(&id);
                let _ = fs::remove_file(self.part_path(&id));
                if remove_if_there(&path)? {
                    out.uploads.push((UserId(meta.user), meta.size));
                }
            } else {
                kept.insert(meta.sha256);
            }
        }
        for (id, path) in records(&self.root.join("media"))? {
            let Ok(meta) = self.meta(&id) else { continue };
            if meta.created_ms < media_before_ms {
                if remove_if_there(&path)? {
                    out.media.push((UserId(meta.user), meta.size));
                }
            } else {
                kept.insert(meta.sha256);
            }
        }
        for dir in fs::read_dir(self.root.join("blobs"))? {
            for blob in fs::read_dir(dir?.path())? {
                let blob = blob?;
                let name = blob.file_name();
                if kept.contains(name.to_str().unwrap_or_default()) {
                    out.bytes += blob.metadata()?.len();
                } else {
                    fs::remove_file(blob.path())?;
                }
            }
        }
        Ok(out)
    }
}

// ---- HTTP ----

/// A request under `/media/`, as routed (`http::route`); the body follows the head.
#[derive(Debug, PartialEq, Eq)]
pub struct MediaRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub head_len: usize,
    pub body_len: usize,
    pub upload_offset: Option<String>,
    pub range: Option<String>,
    pub if_none_match: Option<String>,
}

/// The media path's shared state: settings, store, key, counters, workers.
pub struct Media {
    pub cfg: MediaConfig,
    pub store: Arc<dyn MediaStore>,
    pub key: TokenKey,
    pub stats: Arc<MediaStats>,
    pub workers: Workers,
}

type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting for a media worker; past it a request gets `503` (`Busy`).
const WORKER_QUEUE: usize = 1024;

/// The media path's worker threads: store calls run here, answered to the shard's task over
/// a one-slot channel that wakes it. Bounded queue; full: the request is refused, never waited
/// for on a reactor.
#[derive(Clone)]
pub struct Workers {
    tx: crossbeam_channel::Sender<Job>,
}

impl Workers {
    /// `threads` workers, on `cores` if any are given.
    pub fn start(threads: usize, cores: &[usize]) -> io::Result<Workers> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(WORKER_QUEUE);
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let cores = cores.to_vec();
            std::thread::Builder::new()
                .name(format!("hermod-media-{i}"))
                .spawn(move || {
                    if !cores.is_empty() {
                        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in
                        // bounds for CPU numbers below CPU_SETSIZE (checked by the config),
                        // and the call affects this thread only (pid 0).
                        unsafe {
                            let mut set: libc::cpu_set_t = std::mem::zeroed();
                            for &c in &cores {
                                libc::CPU_SET(c, &mut set);
                            }
                            if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                                tracing::warn!(error = %io::Error::last_os_error(), "pinning a media thread");
                            }
                        }
                    }
                    // Bulk bytes yield to the shards: SCHED_IDLE for this thread only, so it
                    // runs when its core has nothing else to do and a shard waking on that
                    // core preempts it at once. Best effort (a failure leaves it ordinary).
                    // SAFETY: a plain syscall on the calling thread (pid 0) with a valid param.
                    unsafe {
                        let param = libc::sched_param { sched_priority: 0 };
                        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
                    }
                    for job in rx {
                        job();
                    }
                })?;
        }
        Ok(Workers { tx })
    }

    /// Runs `f` on a worker; `Busy` if the queue is full.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, MediaError> + Send + 'static,
    ) -> Result<T, MediaError> {
        let (tx, rx) = async_channel::bounded(1);
        let job: Job = Box::new(move || {
            let _ = tx.send_blocking(f());
        });
        self.tx.try_send(job).map_err(|_| MediaError::Busy)?;
        rx.recv().await.map_err(|_| MediaError::Busy)?
    }
}

type Answer = (u16, Vec<(&'static str, String)>, Vec<u8>);

fn error(status: u16, code: &str, message: &str) -> Answer {
    let body = json!({ "error": { "code": code, "message": message } }).to_string();
    (
        status,
        vec![("Content-Type", "application/json".into())],
        body.into_bytes(),
    )
}

fn ok_json(status: u16, v: serde_json::Value) -> Answer {
    (
        status,
        vec![("Content-Type", "application/json".into())],
        v.to_string().into_bytes(),
    )
}

fn store_error(e: MediaError) -> Answer {
    match e {
        MediaError::NotFound => error(404, "not_found", "no such upload or medium"),
        MediaError::Offset(at) => {
            let mut a = error(409, "offset", &format!("the upload is at offset {at}"));
            a.1.push(("Upload-Offset", at.to_string()));
            a
        }
        MediaError::TooLarge => error(413, "too_large", "past the upload's announced size"),
        MediaError::HashMismatch => error(
            422,
            "hash_mismatch",
            "the content's SHA-256 is not the announced one; the upload was discarded",
        ),
        MediaError::BadProof => error(
            403,
            "bad_proof",
            "the deduplication proof is wrong; the upload was discarded",
        ),
        MediaError::ProofRequired => error(
            400,
            "proof_required",
            "this content is stored already: complete with proof = hex(SHA-256(nonce ‖ content))",
        ),
        MediaError::Forbidden => error(
            403,
            "forbidden",
            "only the user who uploaded a medium may delete it",
        ),
        MediaError::Busy => {
            let mut a = error(503, "busy", "the media workers are busy: retry shortly");
            a.1.push(("Retry-After", "1".into()));
            a
        }
        MediaError::Io(e) => {
            tracing::error!(error = %e, "media store");
            error(500, "internal", "media store failure")
        }
    }
}

/// Answers one media request on `stream`; `buf` holds its head and then its body.
pub async fn serve(
    ctx: &Ctx,
    req: &MediaRequest,
    buf: Vec<u8>,
    stream: &mut TcpStream,
) -> io::Result<()> {
    // `buf` is the connection's whole read buffer: the body is its tail. It moves to the
    // worker as it is (an upload chunk is not copied on the reactor).
    let at = req.head_len;
    let body = &buf[at..];
    let Some(media) = ctx.media.clone() else {
        return write(stream, error(404, "not_found", "media are off")).await;
    };
    let rest = req.path.strip_prefix("/media/").unwrap_or("");
    let parts: Vec<&str> = rest.split('/').collect();
    let answer = match (req.method.as_str(), parts.as_slice()) {
        ("POST", ["uploads"]) => create(&media, body).await,
        ("HEAD", ["uploads", id]) => {
            let (store, id) = (media.store.clone(), id.to_string());
            match media.workers.run(move || store.status(&id)).await {
                Ok((offset, size)) => (
                    204,
                    vec![
                        ("Upload-Offset", offset.to_string()),
                        ("Upload-Length", size.to_string()),
                    ],
                    Vec::new(),
                ),
                Err(e) => store_error(e),
            }
        }
        ("PATCH", ["uploads", id]) => {
            let id = id.to_string();
            append(&media, &id, req, buf, at).await
        }
        ("POST", ["uploads", id, "complete"]) => complete(&media, id, body).await,
        ("GET" | "HEAD", [id]) => return download(&media, id, req, stream).await,
        ("DELETE", [id]) => delete(ctx, &media, id, body).await,
        _ => error(
            405,
            "bad_method",
            "see docs/media.md for the media endpoints",
        ),
    };
    write(stream, answer).await
}

/// `DELETE /media/{id}` with `{"grant"}` from `media_delete`: drops the medium if the grant's
/// user uploaded it, and gives its size back to their quota (a mail to their home shard).
async fn delete(ctx: &Ctx, media: &Media, id: &str, body: &[u8]) -> Answer {
    let sealed = match grant_in(body, "media_delete") {
        Ok(sealed) => sealed,
        Err(answer) => return answer,
    };
    let deletion = hermod_shards::media::Deletion::open(&media.key, &sealed, now_ms() / 1000);
    let Some(deletion) = deletion.filter(|d| d.media == id) else {
        return error(
            403,
            "forbidden",
            "the grant is not genuine, has expired or names another medium: ask media_delete again",
        );
    };
    let (store, id, user) = (media.store.clone(), id.to_owned(), deletion.user);
    match media.workers.run(move || store.delete(&id, user)).await {
        Ok(meta) => {
            media.stats.deleted.fetch_add(1, Ordering::Relaxed);
            ctx.engine
                .borrow_mut()
                .handle_media_released(now_ms(), user, meta.size);
            crate::ctx::dispatch(ctx);
            (204, Vec::new(), Vec::new())
        }
        Err(e) => store_error(e),
    }
}

async fn write(stream: &mut TcpStream, (status, headers, body): Answer) -> io::Result<()> {
    use futures_lite::AsyncWriteExt;
    let head = http::head(status, &headers, body.len() as u64);
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await
}

/// The `grant` of a `{"grant": "…"}` body (from WebSocket op `op`), or the `400` to answer.
fn grant_in(body: &[u8], op: &str) -> Result<String, Answer> {
    #[derive(Deserialize)]
    struct Req {
        grant: String,
    }
    serde_json::from_slice::<Req>(body)
        .map(|req| req.grant)
        .map_err(|_| {
            error(
                400,
                "bad_request",
                &format!("the body is {{\"grant\": \"…\"}}, from {op}"),
            )
        })
}

async fn create(media: &Media, body: &[u8]) -> Answer {
    let sealed = match grant_in(body, "media_upload") {
        Ok(sealed) => sealed,
        Err(answer) => return answer,
    };
    let Some(grant) = Grant::open(&media.key, &sealed, now_ms() / 1000) else {
        return error(
            403,
            "bad_grant",
            "the grant is not genuine or has expired: ask media_upload again",
        );
    };
    let store = media.store.clone();
    let size = grant.size;
    match media
        .workers
        .run(move || store.create(&grant, now_ms()))
        .await
    {
        Ok(Created::Fresh { upload }) => ok_json(
            201,
            json!({ "upload": upload, "offset": 0, "size": size, "chunk_max": media.cfg.chunk_max }),
        ),
        Ok(Created::Dedup { upload, nonce }) => ok_json(
            201,
            json!({ "upload": upload, "dedup": true, "nonce": nonce, "size": size }),
        ),
        Err(e) => store_error(e),
    }
}

async fn append(media: &Media, id: &str, req: &MediaRequest, buf: Vec<u8>, at: usize) -> Answer {
    let len = buf.len() - at;
    let Some(offset) = req
        .upload_offset
        .as_deref()
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return error(
            400,
            "bad_request",
            "send Upload-Offset: the stored length to append at",
        );
    };
    if len > media.cfg.chunk_max {
        return error(
            413,
            "too_large",
            &format!("chunks are at most {} bytes", media.cfg.chunk_max),
        );
    }
    let (store, id) = (media.store.clone(), id.to_owned());
    match media
        .workers
        .run(move || store.append(&id, offset, &buf[at..]))
        .await
    {
        Ok(at) => {
            media
                .stats
                .bytes_in
                .fetch_add(len as u64, Ordering::Relaxed);
            (204, vec![("Upload-Offset", at.to_string())], Vec::new())
        }
        Err(e) => store_error(e),
    }
}

async fn complete(media: &Media, id: &str, body: &[u8]) -> Answer {
    #[derive(Deserialize, Default)]
    struct Req {
        proof: Option<String>,
    }
    let req: Req = if body.is_empty() {
        Req::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(_) => {
                return error(
                    400,
                    "bad_request",
                    "the body is empty or {\"proof\": \"…\"}",
                )
            }
        }
    };
    let (store, id) = (media.store.clone(), id.to_owned());
    match media
        .workers
        .run(move || store.complete(&id, req.proof.as_deref(), now_ms()))
        .await
    {
        Ok((media_id, meta, dedup)) => {
            media
                .stats
                .uploads_completed
                .fetch_add(1, Ordering::Relaxed);
            if dedup {
                media.stats.dedup_hits.fetch_add(1, Ordering::Relaxed);
            }
            let expires = now_ms() / 1000 + media.cfg.url_ttl_s;
            let url = format!(
                "/media/{media_id}?{}",
                capability(&media.key, &media_id, expires)
            );
            ok_json(
                200,
                json!({ "media": media_id, "url": url, "expires": expires, "size": meta.size,
                        "type": meta.mime, "sha256": meta.sha256, "dedup": dedup }),
            )
        }
        Err(e) => {
            if matches!(e, MediaError::HashMismatch | MediaError::BadProof) {
                media.stats.uploads_refused.fetch_add(1, Ordering::Relaxed);
            }
            store_error(e)
        }
    }
}

/// A `Range` header that selects nothing of the medium (answered `416`).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A single byte range of a `Range` header against a body of `size` bytes: `Ok(None)` to
/// send it whole (no header, or several ranges).
pub fn byte_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = match (a.is_empty(), b.is_empty()) {
        (true, false) => {
            let n: u64 = b.parse().map_err(|_| Unsatisfiable)?;
            if n == 0 {
                return Err(Unsatisfiable);
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (false, _) => {
            let start: u64 = a.parse().map_err(|_| Unsatisfiable)?;
            let end: u64 = if b.is_empty() {
                u64::MAX
            } else {
                b.parse().map_err(|_| Unsatisfiable)?
            };
            (start, end.min(size.saturating_sub(1)))
        }
        (true, true) => return Err(Unsatisfiable),
    };
    if start >= size || start > end {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

async fn download(
    media: &Media,
    id: &str,
    req: &MediaRequest,
    stream: &mut TcpStream,
) -> io::Result<()> {
    use futures_lite::AsyncWriteExt;
    let mut expires = None;
    let mut sig = None;
    for pair in req.query.split('&') {
        match pair.split_once('=') {
            Some(("e", v)) => expires = v.parse::<u64>().ok(),
            Some(("s", v)) => sig = Some(v),
            _ => {}
        }
    }
    let now_s = now_ms() / 1000;
    let checked = match (expires, sig) {
        (Some(e), Some(s)) => check_capability(&media.key, id, e, s, now_s),
        _ => Err(false),
    };
    match checked {
        Ok(()) => {}
        Err(true) => {
            return write(
                stream,
                error(
                    403,
                    "expired",
                    "this media URL has expired: ask the sender for a fresh one",
                ),
            )
            .await
        }
        Err(false) => return write(stream, error(403, "forbidden", "not a valid media URL")).await,
    }
    let (store, owned) = (media.store.clone(), id.to_owned());
    let meta = match media.workers.run(move || store.meta(&owned)).await {
        Ok(m) => m,
        Err(e) => return write(stream, store_error(e)).await,
    };
    let etag = format!("\"{}\"", meta.sha256);
    let max_age = expires.unwrap_or(now_s).saturating_sub(now_s);
    let inline = ["image/", "audio/", "video/"]
        .iter()
        .any(|p| meta.mime.starts_with(p));
    let mut headers = vec![
        ("Content-Type", meta.mime.clone()),
        ("Accept-Ranges", "bytes".into()),
        ("ETag", etag.clone()),
        (
            "Cache-Control",
            format!("private, max-age={max_age}, immutable"),
        ),
        ("X-Content-Type-Options", "nosniff".into()),
        // Uploaded content is served from the page's own origin: never let it run as a page.
        (
            "Content-Security-Policy",
            "sandbox; default-src 'none'".into(),
        ),
    ];
    if !inline {
        headers.push(("Content-Disposition", "attachment".into()));
    }
    if req
        .if_none_match
        .as_deref()
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
    {
        return write(stream, (304, headers, Vec::new())).await;
    }
    let (status, start, end) = match byte_range(req.range.as_deref(), meta.size) {
        Ok(None) => (200, 0, meta.size.saturating_sub(1)),
        Ok(Some((a, b))) => {
            headers.push(("Content-Range", format!("bytes {a}-{b}/{}", meta.size)));
            (206, a, b)
        }
        Err(Unsatisfiable) => {
            let mut a = error(416, "range", "the range is outside the medium");
            a.1.push(("Content-Range", format!("bytes */{}", meta.size)));
            return write(stream, a).await;
        }
    };
    let len = if meta.size == 0 { 0 } else { end - start + 1 };
    let head = http::head(status, &headers, len);
    stream.write_all(head.as_bytes()).await?;
    if req.method == "HEAD" {
        return Ok(());
    }
    let mut at = start;
    let meta = Arc::new(meta);
    while at < start + len {
        let n = READ_PIECE.min(start + len - at);
        let (store, m) = (media.store.clone(), meta.clone());
        let piece = match media.workers.run(move || store.read(&m, at, n)).await {
            Ok(p) if p.len() as u64 == n => p,
            // The body was announced: cut the connection rather than send a short one.
            Ok(_) => return Err(io::Error::other("media shorter than its meta")),
            Err(e) => return Err(io::Error::other(e.to_string())),
        };
        stream.write_all(&piece).await?;
        media.stats.bytes_out.fetch_add(n, Ordering::Relaxed);
        at += n;
    }
    Ok(())
}

/// Collects every `gc_interval_s` (run by one shard of the node) uploads abandoned for
/// `upload_ttl_s` and media older than `url_ttl_s` (no URL to them is valid any more), with
/// the content nothing refers to; their sizes go back to their users' quotas.
pub async fn collector(ctx: Ctx) {
    let Some(media) = ctx.media.clone() else {
        return;
    };
    loop {
        glommio::timer::sleep(std::time::Duration::from_secs(
            media.cfg.gc_interval_s.max(1),
        ))
        .await;
        let now = now_ms();
        let uploads = now.saturating_sub(media.cfg.upload_ttl_s * 1000);
        let expired = now.saturating_sub(media.cfg.url_ttl_s * 1000);
        let store = media.store.clone();
        match media
            .workers
            .run(move || store.collect(uploads, expired))
            .await
        {
            Ok(done) => {
                let stats = &media.stats;
                stats.store_bytes.store(done.bytes, Ordering::Relaxed);
                stats
                    .collected
                    .fetch_add(done.uploads.len() as u64, Ordering::Relaxed);
                stats
                    .expired
                    .fetch_add(done.media.len() as u64, Ordering::Relaxed);
                for (user, size) in done.uploads.into_iter().chain(done.media) {
                    ctx.engine
                        .borrow_mut()
                        .handle_media_released(now_ms(), user, size);
                }
                crate::ctx::dispatch(&ctx);
            }
            Err(e) => tracing::error!(error = %e, "collecting media uploads"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(byte_range(None, 10), Ok(None));
        assert_eq!(byte_range(Some("bytes=0-3"), 10), Ok(Some((0, 3))));
        assert_eq!(byte_range(Some("bytes=5-"), 10), Ok(Some((5, 9))));
        assert_eq!(byte_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(byte_range(Some("bytes=8-100"), 10), Ok(Some((8, 9))));
        assert_eq!(
            byte_range(Some("bytes=0-1,4-5"), 10),
            Ok(None),
            "several: whole"
        );
        assert_eq!(byte_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(byte_range(Some("bytes=5-2"), 10), Err(Unsatisfiable));
        assert_eq!(byte_range(Some("bytes=x-"), 10), Err(Unsatisfiable));
    }

    #[test]
    fn appends_of_any_size_and_offset_store_the_exact_bytes_bypassing_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.part");
        File::create(&path).unwrap();
        let direct_io = open_direct(&path, true).unwrap().is_some();
        let content: Vec<u8> = (0..3 * 1024 * 1024 + 17)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut part = OpenOptions::new()
            .append(true)
            .read(true)
            .open(&path)
            .unwrap();
        // Within a block, across block ends from unaligned offsets, exactly aligned, large.
        let sizes = [1, 4094, 1, 4096, 5000, 3, 8192, 1024 * 1024 + 3, 65536];
        let mut at = 0usize;
        for (i, &n) in sizes.iter().cycle().enumerate() {
            let n = n.min(content.len() - at);
            if n == 0 {
                break;
            }
            let how = append_direct(&mut part, &path, at as u64, &content[at..at + n]).unwrap();
            let spans_a_block = (at % DIRECT_ALIGN + n) >= DIRECT_ALIGN;
            if direct_io && spans_a_block {
                assert_eq!(how, Written::Direct, "chunk {i} ({n} bytes at {at})");
            }
            at += n;
            assert_eq!(fs::metadata(&path).unwrap().len(), at as u64);
        }
        assert_eq!(fs::read(&path).unwrap(), content);
        let want = sha256_of(&content[..], b"nonce").unwrap();
        assert_eq!(sha256_file(&path, b"nonce", true).unwrap(), want);
        assert_eq!(sha256_file(&path, b"nonce", false).unwrap(), want);
    }

    #[test]
    fn the_hash_runs_with_the_chunks_and_a_restart_falls_back_to_reading_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"0123456789".repeat(1000);
        let grant = Grant {
            user: UserId(1),
            size: content.len() as u64,
            sha256: Sha256::digest(&content).into(),
            mime: "text/plain".into(),
            expires_s: u64::MAX,
        };
        // Tracked from the first byte to the last: completion reads nothing back.
        let store = FsStore::open(dir.path(), true).unwrap();
        let Created::Fresh { upload } = store.create(&grant, 0).unwrap() else {
            panic!("fresh")
        };
        store.append(&upload, 0, &content[..4000]).unwrap();
        store.append(&upload, 4000, &content[4000..]).unwrap();
        assert_eq!(store.hashing.lock().unwrap()[&upload].0, 10_000);
        store.complete(&upload, None, 0).unwrap();
        assert!(store.hashing.lock().unwrap().is_empty());
        // Half stored, then the process restarts (a new store, an empty table): the rest is
        // not tracked, and the completion hashes the file.
        let wrong = b"x".repeat(10_000);
        let grant = Grant {
            sha256: Sha256::digest(&wrong).into(),
            ..grant
        };
        let Created::Fresh { upload } = store.create(&grant, 0).unwrap() else {
            panic!("fresh")
        };
        store.append(&upload, 0, &wrong[..5000]).unwrap();
        let restarted = FsStore::open(dir.path(), true).unwrap();
        restarted.append(&upload, 5000, &wrong[5000..]).unwrap();
        assert!(restarted.hashing.lock().unwrap().is_empty());
        let (_, meta, _) = restarted.complete(&upload, None, 0).unwrap();
        assert_eq!(restarted.read(&meta, 0, 3).unwrap(), b"xxx");
        // A tracked upload whose bytes are not the announced ones is refused all the same.
        let Created::Fresh { upload } = restarted
            .create(
                &Grant {
                    sha256: [1; 32],
                    ..grant
                },
                0,
            )
            .unwrap()
        else {
            panic!("fresh")
        };
        restarted.append(&upload, 0, &wrong).unwrap();
        assert!(matches!(
            restarted.complete(&upload, None, 0),
            Err(MediaError::HashMismatch)
        ));
    }

    #[test]
    fn an_upload_resumes_completes_once_and_deduplicates_with_a_proof() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path(), true).unwrap();
        let content = b"hello media".to_vec();
        let sha: [u8; 32] = Sha256::digest(&content).into();
        let grant = Grant {
            user: UserId(1),
            size: content.len() as u64,
            sha256: sha,
            mime: "text/plain".into(),
            expires_s: u64::MAX,
        };
        let Created::Fresh { upload } = store.create(&grant, 0).unwrap() else {
            panic!("fresh")
        };
        assert_eq!(store.append(&upload, 0, &content[..5]).unwrap(), 5);
        assert!(matches!(
            store.append(&upload, 0, b"x"),
            Err(MediaError::Offset(5))
        ));
        assert!(matches!(
            store.complete(&upload, None, 0),
            Err(MediaError::Offset(5))
        ));
        assert_eq!(store.status(&upload).unwrap(), (5, 11));
        assert!(matches!(
            store.append(&upload, 5, b"too long for it"),
            Err(MediaError::TooLarge)
        ));
        assert_eq!(store.append(&upload, 5, &content[5..]).unwrap(), 11);
        let (id, meta, dedup) = store.complete(&upload, None, 0).unwrap();
        assert!(!dedup);
        assert_eq!(store.read(&meta, 6, 5).unwrap(), b"media");
        assert_eq!(store.meta(&id).unwrap(), meta);
        // Only its uploader deletes a medium, once; the content stays for the collector.
        let Created::Fresh { upload: gone } = store
            .create(
                &Grant {
                    sha256: Sha256::digest(b"bye").into(),
                    size: 3,
                    ..grant.clone()
                },
                0,
            )
            .unwrap()
        else {
            panic!("fresh")
        };
        store.append(&gone, 0, b"bye").unwrap();
        let (gone, _, _) = store.complete(&gone, None, 0).unwrap();
        assert!(matches!(
            store.delete(&gone, UserId(2)),
            Err(MediaError::Forbidden)
        ));
        assert_eq!(store.delete(&gone, UserId(1)).unwrap().size, 3);
        assert!(matches!(
            store.delete(&gone, UserId(1)),
            Err(MediaError::NotFound)
        ));
        assert!(matches!(store.meta(&gone), Err(MediaError::NotFound)));
        // The same content again: a deduplication, completed only with the right proof.
        let Created::Dedup { upload, nonce } = store.create(&grant, 0).unwrap() else {
            panic!("dedup")
        };
        assert!(matches!(
            store.complete(&upload, None, 0),
            Err(MediaError::ProofRequired)
        ));
        let proof = sha256_of(&content[..], nonce.as_bytes()).unwrap();
        let (again, _, dedup) = store.complete(&upload, Some(&proof), 0).unwrap();
        assert!(dedup && again != id);
        let Created::Dedup { upload, .. } = store.create(&grant, 0).unwrap() else {
            panic!("dedup")
        };
        assert!(matches!(
            store.complete(&upload, Some(&"0".repeat(64)), 0),
            Err(MediaError::BadProof)
        ));
        // Abandoned uploads are collected, and give their size back.
        store.create(&grant, 0).unwrap();
        let wrong = Grant {
            sha256: [9; 32],
            ..grant
        };
        store.create(&wrong, 5).unwrap();
        let done = store.collect(3, 0).unwrap();
        assert_eq!(
            done.uploads,
            vec![(UserId(1), 11)],
            "only the one created before the cutoff"
        );
        assert_eq!(
            (done.media.len(), done.bytes),
            (0, 11),
            "one blob, two media on it"
        );
        // Media past their URLs' lifetime go, and their content with the last of them.
        let done = store.collect(3, 1).unwrap();
        assert_eq!(done.media, vec![(UserId(1), 11), (UserId(1), 11)]);
        assert_eq!(done.bytes, 0);
        assert!(matches!(store.meta(&id), Err(MediaError::NotFound)));
        assert!(!valid_id("../etc/passwd") && valid_id(&new_id()));
    }
}
