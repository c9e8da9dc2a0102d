//! Checked traffic: a small request/response protocol whose every connection ends in a verdict
//! — complete and byte-identical, visibly reset, or corrupted — used by the drain, fault and
//! load tests to drive many connections through skiff and account for each one.
//!
//! A client connects (through a skiff listener) and sends a 32-byte [`Request`] header, then
//! `up` bytes of the seed's pattern, then half-closes. The backend checks the upload (exactly
//! `up` bytes, then a clean end), then answers with its one-byte tag, a one-byte verdict on the
//! upload, and `down` bytes of the pattern, spread over `pace` if asked; then it half-closes.
//! Both lengths are declared up front, so a connection that ends early is *seen* to end early:
//! a truncation counts as a visible reset at the side that notices it, never as success.
//! Anything that arrives wrong — a byte that differs, bytes past the declared end, an upload
//! the backend found short although it ended cleanly — is corruption.
//!
//! The pattern is position-addressable (splitmix64 of seed and word index), so each side
//! checks any chunk at any offset without state.

#![allow(dead_code)] // Each user needs a different subset.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// First bytes of every request.
const MAGIC: &[u8; 4] = b"SKCK";
/// Size of the request header.
pub const HEADER: usize = 32;
/// I/O buffer size.
const CHUNK: usize = 32 * 1024;
/// Salt that makes the download's pattern differ from the upload's.
const DOWN: u64 = 0x646f_776e;

/// What a client asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Seeds the pattern of both directions.
    pub seed: u64,
    /// Bytes the client sends.
    pub up: u32,
    /// Bytes the backend sends back.
    pub down: u32,
    /// Over how long the backend spreads its answer (0: as fast as it can).
    pub pace: Duration,
}

impl Request {
    fn encode(&self) -> [u8; HEADER] {
        let mut out = [0u8; HEADER];
        out[..4].copy_from_slice(MAGIC);
        out[4..12].copy_from_slice(&self.seed.to_be_bytes());
        out[12..16].copy_from_slice(&self.up.to_be_bytes());
        out[16..20].copy_from_slice(&self.down.to_be_bytes());
        out[20..24].copy_from_slice(&(self.pace.as_millis() as u32).to_be_bytes());
        out
    }

    fn decode(raw: &[u8; HEADER]) -> Option<Request> {
        if &raw[..4] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes(raw[i..i + 4].try_into().unwrap_or_default());
        Some(Request {
            seed: u64::from_be_bytes(raw[4..12].try_into().unwrap_or_default()),
            up: u32_at(12),
            down: u32_at(16),
            pace: Duration::from_millis(u32_at(20) as u64),
        })
    }
}

/// splitmix64: the pattern's word `index` for `seed`.
fn word(seed: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern of `seed` from byte `offset` on.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        let at = offset + i as u64;
        *byte = word(seed, at / 8).to_le_bytes()[(at % 8) as usize];
    }
}

/// True if `data` is the pattern of `seed` from byte `offset` on.
pub fn matches(seed: u64, offset: u64, data: &[u8]) -> bool {
    let mut i = 0;
    while i < data.len() {
        let at = offset + i as u64;
        let w = word(seed, at / 8).to_le_bytes();
        let start = (at % 8) as usize;
        let n = (8 - start).min(data.len() - i);
        if data[i..i + n] != w[start..start + n] {
            return false;
        }
        i += n;
    }
    true
}

/// Verdict byte: the upload arrived whole and intact.
const UPLOAD_OK: u8 = 0;
/// Verdict byte: the upload had a wrong byte or more bytes than declared.
const UPLOAD_CORRUPT: u8 = 1;

/// What the backends saw of the uploads, across connections.
#[derive(Default, Debug)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Answers sent to the end (the download may still be cut on its way).
    pub answered: AtomicU64,
    /// Uploads that failed visibly (an error such as a reset) before their end.
    pub upload_reset: AtomicU64,
    /// Uploads that ended cleanly (a FIN) before their declared length. The declared length
    /// shows the truncation; but only a dead process (whose sockets its kernel closes) should
    /// ever cause one: a live router turns an abort into a reset.
    pub upload_truncated: AtomicU64,
    /// The seeds of those connections, to tell which fault they belong to.
    pub truncated_seeds: std::sync::Mutex<Vec<u64>>,
    /// Uploads with a wrong byte or bytes past their end.
    pub upload_corrupt: AtomicU64,
    /// Connections that failed while the answer was being sent.
    pub answer_failed: AtomicU64,
}

impl ServerStats {
    /// Uploads that arrived short or wrong without an error (a FIN where a reset belonged, or
    /// corruption).
    pub fn silent(&self) -> u64 {
        self.upload_truncated.load(Ordering::Relaxed) + self.upload_corrupt.load(Ordering::Relaxed)
    }
}

/// A backend serving checked traffic on a listening socket, tagging its answers with `tag`.
/// Runs on the caller's runtime until the runtime stops.
pub async fn serve(listener: TcpListener, tag: u8, stats: Arc<ServerStats>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            // Usually fd exhaustion: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        tokio::spawn(async move {
            let _ = conn.set_nodelay(true);
            answer(conn, tag, &stats).await;
        });
    }
}

/// Serves one connection.
async fn answer(mut conn: TcpStream, tag: u8, stats: &ServerStats) {
    let mut raw = [0u8; HEADER];
    if let Err(e) = conn.read_exact(&mut raw).await {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            // A clean end before a whole header: the client may have sent nothing at all (a
            // refused connection), so only count it when something arrived.
            return;
        }
        stats.upload_reset.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let Some(req) = Request::decode(&raw) else {
        stats.upload_corrupt.fetch_add(1, Ordering::Relaxed);
        return abort(conn);
    };
    // The upload: exactly `up` bytes of the pattern, then a clean end.
    let mut buf = vec![0u8; CHUNK];
    let mut got: u64 = 0;
    let mut verdict = UPLOAD_OK;
    loop {
        match conn.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                let data = &buf[..n];
                let within = (req.up as u64).saturating_sub(got).min(n as u64) as usize;
                if !matches(req.seed, got, &data[..within]) || within < n {
                    verdict = UPLOAD_CORRUPT;
                }
                got += n as u64;
            }
            Err(_) => {
                stats.upload_reset.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    if got < req.up as u64 {
        // The client's data ended cleanly but short: without the declared length, this would
        // be a silent truncation.
        stats.upload_truncated.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut seeds) = stats.truncated_seeds.lock() {
            seeds.push(req.seed);
        }
        return abort(conn);
    }
    if verdict != UPLOAD_OK {
        stats.upload_corrupt.fetch_add(1, Ordering::Relaxed);
    }
    let sent = async {
        conn.write_all(&[tag, verdict]).await?;
        let total = req.down as u64;
        let start = tokio::time::Instant::now();
        let mut off: u64 = 0;
        while off < total {
            let n = (total - off).min(CHUNK as u64) as usize;
            fill(req.seed ^ DOWN, off, &mut buf[..n]);
            if !req.pace.is_zero() {
                // Spread the answer evenly over `pace`.
                let due = start + req.pace.mul_f64(off as f64 / total as f64);
                tokio::time::sleep_until(due).await;
            }
            conn.write_all(&buf[..n]).await?;
            off += n as u64;
        }
        if !req.pace.is_zero() {
            tokio::time::sleep_until(start + req.pace).await;
        }
        conn.shutdown().await?;
        // Wait for the client to close, so the last bytes are not cut short by our close.
        while conn.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    match sent.await {
        Ok(()) => {
            stats.answered.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {
            stats.answer_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Closes with a RST.
fn abort(conn: TcpStream) {
    let _ = conn.set_zero_linger();
}

/// How one client connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every byte arrived, intact, both ways, and the connection ended cleanly.
    Completed,
    /// The connection could not be made (refused by the kernel).
    Refused,
    /// It failed visibly: an error, or an end before the declared length.
    Reset(String),
    /// Wrong bytes arrived, or more than declared, or the backend found the upload corrupt.
    Corrupted(String),
    /// It neither finished nor failed within the client's deadline.
    Hung,
}

/// One client connection's result.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// How it ended.
    pub verdict: Verdict,
    /// The answering backend's tag, if the answer began.
    pub tag: Option<u8>,
    /// When the client started it.
    pub started: Instant,
    /// When it ended.
    pub ended: Instant,
    /// Download bytes that arrived intact.
    pub received: u64,
}

/// Makes one checked connection to `addr` with `req`, giving up after `deadline`.
pub async fn exchange(addr: SocketAddr, req: Request, deadline: Duration) -> Outcome {
    exchange_with(addr, req, None, deadline).await
}

/// Like [`exchange`], for a long-lived connection: it sends half its upload, counts itself
/// in `held`, keeps the connection open both ways until `until`, then sends the rest and takes
/// its answer (for which it has `deadline`).
pub async fn exchange_held(
    addr: SocketAddr,
    req: Request,
    until: tokio::time::Instant,
    held: &AtomicU64,
    deadline: Duration,
) -> Outcome {
    let deadline = until.saturating_duration_since(tokio::time::Instant::now()) + deadline;
    exchange_with(addr, req, Some((until, held)), deadline).await
}

async fn exchange_with(
    addr: SocketAddr,
    req: Request,
    hold: Option<(tokio::time::Instant, &AtomicU64)>,
    deadline: Duration,
) -> Outcome {
    let started = Instant::now();
    let mut tag = None;
    let mut received = 0u64;
    let verdict = match tokio::time::timeout(
        deadline,
        run_client(addr, req, hold, &mut tag, &mut received),
    )
    .await
    {
        Ok(verdict) => verdict,
        Err(_) => Verdict::Hung,
    };
    Outcome {
        verdict,
        tag,
        started,
        ended: Instant::now(),
        received,
    }
}

async fn run_client(
    addr: SocketAddr,
    req: Request,
    hold: Option<(tokio::time::Instant, &AtomicU64)>,
    tag: &mut Option<u8>,
    received: &mut u64,
) -> Verdict {
    let mut conn = match TcpStream::connect(addr).await {
        Ok(conn) => conn,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Verdict::Refused,
        Err(e) => return Verdict::Reset(format!("connect: {e}")),
    };
    let _ = conn.set_nodelay(true);
    let (mut rd, mut wr) = conn.split();
    // Upload and download run at once, as a real client's would: a reset in either shows.
    let upload = async {
        wr.write_all(&req.encode()).await?;
        let mut buf = vec![0u8; CHUNK];
        let mut off: u64 = 0;
        let mut hold = hold;
        while off < req.up as u64 {
            let mut n = (req.up as u64 - off).min(CHUNK as u64) as usize;
            if hold.is_some() {
                n = n.min((req.up as u64 / 2).saturating_sub(off).max(1) as usize);
            }
            fill(req.seed, off, &mut buf[..n]);
            wr.write_all(&buf[..n]).await?;
            off += n as u64;
            if off >= req.up as u64 / 2 {
                if let Some((until, held)) = hold.take() {
                    held.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep_until(until).await;
                }
            }
        }
        wr.shutdown().await
    };
    let download = async {
        let mut head = [0u8; 2];
        let mut got = 0;
        while got < 2 {
            match rd.read(&mut head[got..]).await {
                Ok(0) => return Err(Verdict::Reset("ended before the answer".into())),
                Ok(n) => got += n,
                Err(e) => return Err(Verdict::Reset(format!("before the answer: {e}"))),
            }
        }
        *tag = Some(head[0]);
        if head[1] != UPLOAD_OK {
            return Err(Verdict::Corrupted(
                "the backend got a corrupt upload".into(),
            ));
        }
        let total = req.down as u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) if *received == total => return Ok(()),
                Ok(0) => {
                    return Err(Verdict::Reset(format!(
                        "ended after {} of {total} bytes",
                        *received
                    )))
                }
                Ok(n) => {
                    if *received + n as u64 > total {
                        return Err(Verdict::Corrupted(format!(
                            "{} bytes past the declared {total}",
                            *received + n as u64 - total
                        )));
                    }
                    if !matches(req.seed ^ DOWN, *received, &buf[..n]) {
                        return Err(Verdict::Corrupted(format!(
                            "wrong bytes at {} of {total}",
                            *received
                        )));
                    }
                    *received += n as u64;
                }
                Err(e) => {
                    return Err(Verdict::Reset(format!(
                        "after {} of {total} bytes: {e}",
                        *received
                    )))
                }
            }
        }
    };
    let (up, down) = tokio::join!(upload, download);
    match (down, up) {
        (Err(verdict), _) => verdict,
        (Ok(()), Err(e)) => Verdict::Reset(format!("upload: {e}")),
        (Ok(()), Ok(())) => Verdict::Completed,
    }
}

/// Counts of verdicts.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Connections made (the kernel accepted them): carried, or at least offered to skiff.
    pub carried: u64,
    /// Completed byte-identical.
    pub completed: u64,
    /// Visibly reset.
    pub reset: u64,
    /// Corrupted.
    pub corrupted: u64,
    /// Hung past their deadline.
    pub hung: u64,
    /// Refused at connect (never carried).
    pub refused: u64,
    /// A few examples of resets and corruptions, for reports.
    pub examples: Vec<String>,
}

impl Tally {
    /// Counts one outcome.
    pub fn add(&mut self, outcome: &Outcome) {
        let tag = outcome.tag.map(char::from);
        let example = |examples: &mut Vec<String>, what: &str, why: &str| {
            if examples.len() < 12 {
                match tag {
                    Some(tag) => examples.push(format!("{what} (answered by {tag}): {why}")),
                    None => examples.push(format!("{what}: {why}")),
                }
            }
        };
        match &outcome.verdict {
            Verdict::Refused => {
                self.refused += 1;
                return;
            }
            Verdict::Completed => self.completed += 1,
            Verdict::Reset(why) => {
                self.reset += 1;
                example(&mut self.examples, "reset", why);
            }
            Verdict::Corrupted(why) => {
                self.corrupted += 1;
                example(&mut self.examples, "CORRUPTED", why);
            }
            Verdict::Hung => {
                self.hung += 1;
                example(&mut self.examples, "HUNG", "no end within the deadline");
            }
        }
        self.carried += 1;
    }

    /// Adds another tally's counts.
    pub fn merge(&mut self, other: &Tally) {
        self.carried += other.carried;
        self.completed += other.completed;
        self.reset += other.reset;
        self.corrupted += other.corrupted;
        self.hung += other.hung;
        self.refused += other.refused;
        for e in &other.examples {
            if self.examples.len() < 12 {
                self.examples.push(e.clone());
            }
        }
    }
}

/// A running count shared by many tasks.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one; returns the count before.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_position_addressable() {
        let mut whole = vec![0u8; 1000];
        fill(7, 0, &mut whole);
        assert!(matches(7, 0, &whole));
        assert!(matches(7, 13, &whole[13..500]));
        assert!(!matches(8, 0, &whole));
        let mut part = vec![0u8; 77];
        fill(7, 101, &mut part);
        assert_eq!(part, whole[101..178]);
        let mut bad = whole.clone();
        bad[999] ^= 1;
        assert!(!matches(7, 0, &bad));
    }
}
