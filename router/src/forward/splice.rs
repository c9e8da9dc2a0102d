//! Byte copying between a carried connection's two ends, with half-close and aborts preserved.
//!
//! Each direction runs until its source ends. A clean end (TCP FIN, stream finish) is passed on
//! as a clean end and the other direction keeps going: half-close survives the trip. An abort
//! (TCP RST or error, stream reset, dead link) ends *both* directions at once and is passed on as
//! an abort: the stream is reset and the TCP socket is closed with RST (zero linger), so a
//! broken connection never looks like a complete one. When the site stops (its shutdown token
//! fires), every splice aborts the same way: a stopping router resets what it still carries
//! rather than letting process exit close the sockets with a FIN.
//!
//! Memory per connection is bounded: reads land in one buffer per thread (see `READ_BUFFER`),
//! so a connection holds at most the chunk it is passing on in each direction, and the
//! transport's flow control stops a sender whose reader is slow.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{ready, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::link::transport::{RecvStream, SendStream};
use crate::metrics::Tally;

/// Largest read from a TCP socket between two TCP connections (a listener served by this
/// site's own connector). A 48 KiB write fits in one 64 KiB TCP segment; reads towards a link
/// take what the link's transport carries best ([`SendStream::chunk_size`]).
const TCP_TO_TCP_CHUNK: usize = 48 * 1024;

/// How a carried connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// Both directions ended cleanly.
    Clean,
    /// One side aborted (the reason says which); the other side was aborted too.
    Aborted(String),
}

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Moved {
    /// From the TCP side (or the first stream) towards the other end.
    pub(crate) up: u64,
    /// Towards the TCP side (or the first stream).
    pub(crate) down: u64,
}

/// What an abort on shutdown reports.
pub(crate) const STOPPING: &str = "site stopping";
/// Bound on waiting for the peer to acknowledge a finished stream's last bytes.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// After a clean end: waits (bounded, or until `stop`) for `delivery` — the peers having
/// what was sent to them — so that the connection counts as carried until then: a draining
/// router closes its links once its last connection is done, and must not cut the tail of a
/// finished one.
async fn settle(delivery: impl Future<Output = ()>, stop: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::timeout(DELIVERY_TIMEOUT, delivery) => {}
        () = stop.cancelled() => {}
    }
}

/// Runs two directions; on the first failure, or when `stop` fires, stops both. Returns which
/// failed, if any.
async fn both<U, D>(up: U, down: D, stop: &CancellationToken) -> Result<(), String>
where
    U: Future<Output = Result<(), String>>,
    D: Future<Output = Result<(), String>>,
{
    let (mut up, mut down) = (pin!(up), pin!(down));
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            result = &mut up, if !up_done => { result?; up_done = true; }
            result = &mut down, if !down_done => { result?; down_done = true; }
            () = stop.cancelled() => return Err(STOPPING.into()),
        }
    }
    Ok(())
}

/// Carries bytes between a TCP connection and a link stream. `leftover` is data that arrived
/// on the stream ahead of the splice (after its header) and goes to the TCP side first.
///
/// `up` counts bytes from the TCP side into the stream, `down` the other way, as they pass.
pub(crate) async fn tcp_stream<S: SendStream, R: RecvStream>(
    mut tcp: TcpStream,
    mut send: S,
    mut recv: R,
    leftover: Bytes,
    (up, down): (Tally, Tally),
    stop: &CancellationToken,
) -> (End, Moved) {
    let (mut up_n, mut down_n) = (0u64, 0u64);
    let result = {
        let (mut rd, mut wr) = tcp.split();
        let chunk_size = send.chunk_size();
        let up = async {
            loop {
                match read_chunk(&mut rd, chunk_size).await {
                    Ok(None) => return send.finish().map_err(|e| e.to_string()),
                    Ok(Some(chunk)) => {
                        up_n += chunk.len() as u64;
                        up.add(chunk.len());
                        send.send(chunk).await.map_err(|e| e.to_string())?;
                    }
                    Err(e) => return Err(format!("client side: {e}")),
                }
            }
        };
        let down = async {
            if !leftover.is_empty() {
                down_n += leftover.len() as u64;
                down.add(leftover.len());
                wr.write_all(&leftover)
                    .await
                    .map_err(|e| format!("client side: {e}"))?;
            }
            loop {
                match recv.recv().await {
                    Ok(Some(chunk)) => {
                        down_n += chunk.len() as u64;
                        down.add(chunk.len());
                        wr.write_all(&chunk)
                            .await
                            .map_err(|e| format!("client side: {e}"))?;
                    }
                    Ok(None) => {
                        // A clean end from the far side is a FIN here; errors on shutdown mean
                        // the client is gone, which the other direction will notice.
                        let _ = wr.shutdown().await;
                        return Ok(());
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        both(up, down, stop).await
    };
    let moved = Moved {
        up: up_n,
        down: down_n,
    };
    match result {
        Ok(()) => {
            settle(send.delivered(), stop).await;
            (End::Clean, moved)
        }
        Err(reason) => {
            send.reset();
            abort_tcp(tcp);
            (End::Aborted(reason), moved)
        }
    }
}

/// Carries bytes between two link streams (a transit router); `up` counts bytes from `a` to
/// `b`, `down` the other way.
pub(crate) async fn stream_stream<S1, R1, S2, R2>(
    (mut send_a, mut recv_a): (S1, R1),
    (mut send_b, mut recv_b): (S2, R2),
    leftover_to_b: Bytes,
    (up, down): (Tally, Tally),
    stop: &CancellationToken,
) -> (End, Moved)
where
    S1: SendStream,
    R1: RecvStream,
    S2: SendStream,
    R2: RecvStream,
{
    let (mut up_n, mut down_n) = (0u64, 0u64);
    let result = {
        let up = async {
            if !leftover_to_b.is_empty() {
                up_n += leftover_to_b.len() as u64;
                up.add(leftover_to_b.len());
                send_b
                    .send(leftover_to_b.clone())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            relay(&mut recv_a, &mut send_b, &mut up_n, &up).await
        };
        let down = relay(&mut recv_b, &mut send_a, &mut down_n, &down);
        both(up, down, stop).await
    };
    let moved = Moved {
        up: up_n,
        down: down_n,
    };
    match result {
        Ok(()) => {
            let both = async {
                tokio::join!(send_a.delivered(), send_b.delivered());
            };
            settle(both, stop).await;
            (End::Clean, moved)
        }
        Err(reason) => {
            send_a.reset();
            send_b.reset();
            (End::Aborted(reason), moved)
        }
    }
}

async fn relay<R: RecvStream, S: SendStream>(
    recv: &mut R,
    send: &mut S,
    count: &mut u64,
    tally: &Tally,
) -> Result<(), String> {
    loop {
        match recv.recv().await {
            Ok(Some(chunk)) => {
                *count += chunk.len() as u64;
                tally.add(chunk.len());
                send.send(chunk).await.map_err(|e| e.to_string())?;
            }
            Ok(None) => return send.finish().map_err(|e| e.to_string()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Carries bytes between two TCP connections (a listener served by this site's own
/// connector), with the same half-close and abort rules; `up` counts client-to-server bytes.
pub(crate) async fn tcp_tcp(
    mut client: TcpStream,
    mut server: TcpStream,
    (up, down): (Tally, Tally),
    stop: &CancellationToken,
) -> (End, Moved) {
    let (mut up_n, mut down_n) = (0u64, 0u64);
    let result = {
        let (mut client_rd, mut client_wr) = client.split();
        let (mut server_rd, mut server_wr) = server.split();
        let to_server = copy_tcp(&mut client_rd, &mut server_wr, &mut up_n, &up, "client");
        let to_client = copy_tcp(&mut server_rd, &mut client_wr, &mut down_n, &down, "server");
        both(to_server, to_client, stop).await
    };
    let moved = Moved {
        up: up_n,
        down: down_n,
    };
    match result {
        Ok(()) => (End::Clean, moved),
        Err(reason) => {
            abort_tcp(client);
            abort_tcp(server);
            (End::Aborted(reason), moved)
        }
    }
}

/// One direction of a TCP-to-TCP splice: a clean end becomes a FIN, an error an abort.
async fn copy_tcp(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    count: &mut u64,
    tally: &Tally,
    side: &str,
) -> Result<(), String> {
    loop {
        match read_chunk(from, TCP_TO_TCP_CHUNK).await {
            Ok(None) => {
                let _ = to.shutdown().await;
                return Ok(());
            }
            Ok(Some(chunk)) => {
                *count += chunk.len() as u64;
                tally.add(chunk.len());
                to.write_all(&chunk)
                    .await
                    .map_err(|e| format!("writing: {e}"))?;
            }
            Err(e) => return Err(format!("{side} side: {e}")),
        }
    }
}

/// Below this, a chunk read is copied out of the read buffer instead of keeping it.
const SMALL_CHUNK: usize = 4096;

thread_local! {
    /// Where reads from carried connections land: one buffer per runtime thread, not per
    /// connection, so an idle connection holds none. A small read is copied out and the buffer
    /// is reused; a large one takes the buffer with it (no copy) and the next read allocates
    /// another. Request/response traffic thus allocates only the bytes it carries, where a
    /// fresh 128 KiB buffer per read (the read size then) cost a large allocation and free for
    /// every message.
    static READ_BUFFER: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// Reads what `from` has, up to `limit` bytes; `None` at its end (see [`READ_BUFFER`] for
/// where the bytes land).
///
/// The read itself goes through `poll_read`, not `try_read`: a read that returns less than
/// asked tells tokio the socket is drained, where `try_read` leaves it marked readable, so the
/// next call made one more `recvfrom` only to get `EAGAIN` — a wasted system call per message
/// in request/response traffic.
async fn read_chunk(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    limit: usize,
) -> std::io::Result<Option<Bytes>> {
    poll_fn(|cx| {
        READ_BUFFER.with_borrow_mut(|buf| {
            if buf.capacity() < limit {
                buf.reserve(limit);
            }
            // At most `limit`, whatever the allocator rounded the capacity up to.
            let room = &mut (&mut *buf).limit(limit);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *from),
                cx,
                room
            ))?;
            let chunk = match n {
                0 => None,
                n if n < SMALL_CHUNK => {
                    let small = Bytes::copy_from_slice(buf);
                    buf.clear();
                    Some(small)
                }
                _ => Some(std::mem::take(buf).freeze()),
            };
            Poll::Ready(Ok(chunk))
        })
    })
    .await
}

/// Closes a TCP connection with RST instead of FIN.
pub(crate) fn abort_tcp(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (dialed.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn small_reads_reuse_the_read_buffer_and_large_ones_take_it_whole() {
        const LIMIT: usize = TCP_TO_TCP_CHUNK;
        let (mut writer, mut reader) = connected().await;
        let (mut from, _) = reader.split();

        writer.write_all(&[7; 64]).await.unwrap();
        let mut small = Vec::new();
        while small.len() < 64 {
            small.extend_from_slice(&read_chunk(&mut from, LIMIT).await.unwrap().unwrap());
        }
        assert_eq!(small, [7; 64]);
        // The bytes were copied out; the buffer stays with the thread, empty, for the next read.
        let (len, capacity) = READ_BUFFER.with_borrow(|b| (b.len(), b.capacity()));
        assert_eq!(len, 0);
        assert!(capacity >= LIMIT);

        let total = 4 * LIMIT;
        let sending = tokio::spawn(async move {
            writer.write_all(&vec![9; total]).await.unwrap();
            writer.shutdown().await.unwrap();
            writer
        });
        let mut received = 0;
        while let Some(chunk) = read_chunk(&mut from, LIMIT).await.unwrap() {
            assert!(chunk.len() <= LIMIT, "a read is at most its limit");
            assert!(chunk.iter().all(|&b| b == 9));
            if chunk.len() >= SMALL_CHUNK {
                // Handed on without a copy: the thread's buffer went with the chunk.
                assert_eq!(READ_BUFFER.with_borrow(|b| b.capacity()), 0);
            }
            received += chunk.len();
        }
        assert_eq!(received, total);
        drop(sending.await.unwrap());
    }
}
