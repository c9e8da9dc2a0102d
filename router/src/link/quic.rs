//! The QUIC link transport: each carried connection is a native QUIC bidirectional stream.
//!
//! QUIC (quinn, with the same rustls provider, certificates and mutual-TLS identity as TLS
//! links) suits lossy, long-distance links: a lost packet stalls only the streams whose data it
//! carried, not every connection on the link as one TCP connection would. One QUIC connection
//! is symmetric, so unlike the TLS transport no second connection is needed.
//!
//! Stream semantics match the TLS transport: `finish` is a FIN in one direction, `reset` a
//! RESET_STREAM (and the receiver's STOP_SENDING), a dead connection fails every stream. quinn
//! *finishes* a send stream that is dropped unfinished; [`QuicSend`] resets it instead, so an
//! abandoned stream can never pass for a complete one.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::VarInt;

use super::transport::{RecvStream, SendStream, StreamError, Transport};

/// Application error code for a stream reset (an aborted carried connection).
const RESET_CODE: VarInt = VarInt::from_u32(1);
/// Application error code for closing a link.
const CLOSE_CODE: VarInt = VarInt::from_u32(0);

/// Flow-control window of one stream (bounds memory per carried connection).
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Flow-control window of a whole connection: unlimited, as for TLS links, so that streams
/// whose readers stalled cannot freeze the others; the per-stream window bounds memory.
/// Unacknowledged bytes a connection may buffer for sending: unlimited too, for the same
/// reason; the peer's per-stream windows bound it. A finite send window is connection-wide
/// flow control in disguise: when it is full, quinn wakes the streams blocked on it most recent
/// first, so on a slow (lossy) path the streams that blocked first, the control stream among
/// them, starve. With 32 MiB, `cargo bench --bench lossy` saw one of 16 transfers get nothing
/// for 20 s, and heartbeat RTTs of up to 0.5 s on a 50 ms path (docs/performance.md).
const SEND_WINDOW: u64 = u64::MAX;
/// A connection silent for this long is dropped by QUIC itself; link heartbeats notice a dead
/// peer much sooner (1 s), this is the backstop.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// QUIC transport settings shared by both ends of every link; the peer may have at most
/// `max_streams` bidirectional streams open towards this end at once (QUIC MAX_STREAMS: quinn
/// grants more as streams close).
pub fn transport_config(max_streams: u32) -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::MAX)
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        // BBR rather than quinn's default, CUBIC: CUBIC reads every lost packet as congestion,
        // so on a path with random loss one link (one congestion controller for all its
        // streams) runs no faster than one TCP connection. With 2% loss and 50 ms RTT over a
        // 100 Mbit/s bottleneck, 16 transfers got 0.9 Mbit/s in all with CUBIC (NewReno: the
        // same) and 90 Mbit/s with BBR. Caveat: quinn marks its BBR experimental and it
        // overestimates bandwidth, sending about twice what a full bottleneck passes (Linux
        // TCP BBR on the same path: almost no drops); see docs/performance.md.
        .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        config.max_idle_timeout(Some(idle));
    }
    Arc::new(config)
}

/// Kernel buffer asked for on each QUIC socket, each way. A link is one UDP socket carrying
/// every stream, so bursts are large: with Linux's default 208 KiB receive buffer a loopback
/// transfer dropped packets by the hundred thousand (docs/performance.md).
const SOCKET_BUFFER: usize = 8 * 1024 * 1024;
/// Below this the daemon warns that the kernel capped the buffers.
const SOCKET_BUFFER_WARN: usize = 1024 * 1024;
/// Most bytes of a carried connection one stream write takes ([`SendStream::chunk_size`]).
/// quinn cuts writes into packets itself, so no boundary matters, and it takes large writes
/// best: with 48 KiB (what suits TLS links) a single stream carried 8 % less at 10 % more CPU
/// per GB than with 128 KiB.
const SEND_CHUNK: usize = 128 * 1024;

/// Asks for large kernel buffers on a QUIC socket; warns (once per process) when the kernel's
/// `net.core.rmem_max` / `wmem_max` cap them, with the command that raises the cap.
fn size_buffers(socket: &std::net::UdpSocket) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let recv = sock.recv_buffer_size().unwrap_or(0);
    let send = sock.send_buffer_size().unwrap_or(0);
    if recv < SOCKET_BUFFER_WARN || send < SOCKET_BUFFER_WARN {
        WARNED.call_once(|| {
            tracing::warn!(
                recv_kib = recv / 1024,
                send_kib = send / 1024,
                "the kernel capped QUIC socket buffers; fast QUIC links will drop packets. \
                 Raise the cap: sysctl -w net.core.rmem_max=16777216 net.core.wmem_max=16777216"
            );
        });
    }
}

/// A QUIC endpoint serving links on `socket` (the UDP link port), each with at most
/// `max_streams` streams from the peer at once. It also dials out.
pub fn server_endpoint(
    socket: std::net::UdpSocket,
    tls: Arc<rustls::ServerConfig>,
    max_streams: u32,
) -> std::io::Result<quinn::Endpoint> {
    size_buffers(&socket);
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(max_streams));
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// A dial-only QUIC endpoint on an ephemeral UDP port (for sites that do not serve QUIC).
pub fn client_endpoint() -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))?;
    size_buffers(&socket);
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Dials `addr` (verifying the server as `server_name` with `tls`); the server may have at most
/// `max_streams` streams open towards this end at once.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    tls: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    server_name: &str,
    max_streams: u32,
) -> Result<quinn::Connection, String> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| format!("QUIC: {e}"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(max_streams));
    endpoint
        .connect_with(config, addr, server_name)
        .map_err(|e| format!("QUIC: {e}"))?
        .await
        .map_err(|e| format!("QUIC: {e}"))
}

/// A link carried by one QUIC connection.
pub struct QuicTransport {
    conn: quinn::Connection,
}

impl QuicTransport {
    /// Wraps an established connection.
    pub fn new(conn: quinn::Connection) -> Self {
        QuicTransport { conn }
    }

    /// The connection's current path RTT as QUIC measures it.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// STREAM frames received so far. Only the peer's router puts data on streams; ACKs and
    /// keep-alives come from its QUIC stack alone and would keep a stuck router looking alive.
    pub fn received(&self) -> u64 {
        self.conn.stats().frame_rx.stream
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self.conn.close(CLOSE_CODE, b"link closed");
    }
}

impl Transport for QuicTransport {
    type Send = QuicSend;
    type Recv = QuicRecv;

    async fn open(&self) -> Result<(QuicSend, QuicRecv), StreamError> {
        let (send, recv) = self.conn.open_bi().await.map_err(connection_error)?;
        Ok((QuicSend::new(send), QuicRecv { inner: recv }))
    }

    async fn accept(&self) -> Option<(QuicSend, QuicRecv)> {
        let (send, recv) = self.conn.accept_bi().await.ok()?;
        Some((QuicSend::new(send), QuicRecv { inner: recv }))
    }

    async fn closed(&self) {
        self.conn.closed().await;
    }

    fn close(&self) {
        self.conn.close(CLOSE_CODE, b"link closed");
    }

    fn received(&self) -> u64 {
        QuicTransport::received(self)
    }
}

/// The sending half of a QUIC stream.
pub struct QuicSend {
    inner: quinn::SendStream,
    done: bool,
}

impl QuicSend {
    fn new(inner: quinn::SendStream) -> Self {
        if is_control_stream(inner.id()) {
            // Control messages (heartbeats, routes, renewals) go ahead of carried connections'
            // data: on a busy link they would otherwise wait their round-robin turn behind
            // every stream with data queued.
            let _ = inner.set_priority(CONTROL_PRIORITY);
        }
        QuicSend { inner, done: false }
    }
}

/// Send priority of the control stream; carried connections keep quinn's default, 0.
const CONTROL_PRIORITY: i32 = 1;

/// Whether `id` is the link's control stream: the dialer opens it before any other (see
/// `dial.rs`), so it is the first bidirectional stream the client opens.
fn is_control_stream(id: quinn::StreamId) -> bool {
    id.index() == 0 && id.initiator() == quinn::Side::Client && id.dir() == quinn::Dir::Bi
}

impl Drop for QuicSend {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.inner.reset(RESET_CODE);
        }
    }
}

impl SendStream for QuicSend {
    async fn send(&mut self, data: Bytes) -> Result<(), StreamError> {
        self.inner.write_chunk(data).await.map_err(|e| match e {
            quinn::WriteError::Stopped(_) => StreamError::Reset,
            quinn::WriteError::ConnectionLost(e) => connection_error(e),
            other => StreamError::LinkClosed(other.to_string()),
        })
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.done = true;
        self.inner
            .finish()
            .map_err(|e| StreamError::LinkClosed(e.to_string()))
    }

    fn reset(&mut self) {
        self.done = true;
        let _ = self.inner.reset(RESET_CODE);
    }

    fn chunk_size(&self) -> usize {
        SEND_CHUNK
    }

    async fn delivered(&mut self) {
        // Resolves once the peer acknowledged every byte and the finish (or stopped the
        // stream, or the connection died).
        let _ = self.inner.stopped().await;
    }
}

/// The receiving half of a QUIC stream.
pub struct QuicRecv {
    inner: quinn::RecvStream,
}

impl RecvStream for QuicRecv {
    async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
        loop {
            return match self.inner.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) if chunk.bytes.is_empty() => continue,
                Ok(Some(chunk)) => Ok(Some(chunk.bytes)),
                Ok(None) => Ok(None),
                Err(quinn::ReadError::Reset(_)) => Err(StreamError::Reset),
                Err(quinn::ReadError::ConnectionLost(e)) => Err(connection_error(e)),
                Err(other) => Err(StreamError::LinkClosed(other.to_string())),
            };
        }
    }
}

fn connection_error(e: quinn::ConnectionError) -> StreamError {
    StreamError::LinkClosed(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_certs::{Authority, Revocations};
    use uuid::Uuid;

    /// Two endpoints on loopback with real certificates; returns both ends of one connection.
    async fn pair() -> (QuicTransport, QuicTransport) {
        let server_site = Uuid::new_v4();
        let client_site = Uuid::new_v4();
        let ca = Authority::generate(server_site, "server").unwrap();
        let server_cert = ca
            .issue_server(&["127.0.0.1".into()], Duration::from_secs(3600))
            .unwrap();
        let (key, csr) = skiff_certs::generate_csr(client_site, "client").unwrap();
        let client_cert = skiff_certs::CertifiedKey {
            cert_pem: ca
                .sign_client_csr(&csr, client_site, "client", Duration::from_secs(3600))
                .unwrap(),
            key_pem: key,
        };
        let alpn: &[&[u8]] = &[crate::ALPN_LINK];
        let server_tls =
            skiff_certs::server_config(ca.cert_pem(), &server_cert, Revocations::default(), alpn)
                .unwrap();
        let client_tls =
            skiff_certs::client_config(ca.cert_pem(), Some(&client_cert), Some(server_site), alpn)
                .unwrap();
        let server = server_endpoint(
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
            server_tls,
            1000,
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let client = client_endpoint().unwrap();
        let (a, b) = tokio::join!(
            connect(&client, client_tls, addr, "127.0.0.1", 1000),
            async { server.accept().await.unwrap().await.unwrap() }
        );
        (QuicTransport::new(a.unwrap()), QuicTransport::new(b))
    }

    #[tokio::test]
    async fn half_close_and_reset_are_distinct() {
        let (a, b) = pair().await;
        let (mut s1, mut r1) = a.open().await.unwrap();
        s1.send(Bytes::from_static(b"ping")).await.unwrap();
        s1.finish().unwrap();
        let (mut s2, mut r2) = b.accept().await.unwrap();
        assert_eq!(r2.recv().await.unwrap().unwrap(), &b"ping"[..]);
        assert_eq!(r2.recv().await.unwrap(), None);
        s2.send(Bytes::from_static(b"pong")).await.unwrap();
        s2.finish().unwrap();
        assert_eq!(r1.recv().await.unwrap().unwrap(), &b"pong"[..]);
        assert_eq!(r1.recv().await.unwrap(), None);

        let (mut s3, _r3) = a.open().await.unwrap();
        s3.send(Bytes::from_static(b"partial")).await.unwrap();
        let (_s4, mut r4) = b.accept().await.unwrap();
        assert_eq!(r4.recv().await.unwrap().unwrap(), &b"partial"[..]);
        s3.reset();
        assert_eq!(r4.recv().await, Err(StreamError::Reset));
    }

    #[tokio::test]
    async fn the_control_stream_is_sent_first() {
        let (a, b) = pair().await;
        let (mut control, _r1) = a.open().await.unwrap();
        let (mut data, _r2) = a.open().await.unwrap();
        assert_eq!(control.inner.priority().unwrap(), CONTROL_PRIORITY);
        assert_eq!(data.inner.priority().unwrap(), 0);
        control.send(Bytes::from_static(b"c")).await.unwrap();
        data.send(Bytes::from_static(b"d")).await.unwrap();
        let (control_back, _r3) = b.accept().await.unwrap();
        let (data_back, _r4) = b.accept().await.unwrap();
        assert_eq!(control_back.inner.priority().unwrap(), CONTROL_PRIORITY);
        assert_eq!(data_back.inner.priority().unwrap(), 0);
    }

    #[tokio::test]
    async fn dropping_an_unfinished_stream_resets_it() {
        let (a, b) = pair().await;
        let (mut s1, _r1) = a.open().await.unwrap();
        s1.send(Bytes::from_static(b"x")).await.unwrap();
        let (_s2, mut r2) = b.accept().await.unwrap();
        assert_eq!(r2.recv().await.unwrap().unwrap(), &b"x"[..]);
        drop(s1);
        assert_eq!(r2.recv().await, Err(StreamError::Reset));
    }

    #[tokio::test]
    async fn a_closed_link_fails_open_streams() {
        let (a, b) = pair().await;
        let (mut s1, _r1) = a.open().await.unwrap();
        s1.send(Bytes::from_static(b"x")).await.unwrap();
        let (_s2, mut r2) = b.accept().await.unwrap();
        assert_eq!(r2.recv().await.unwrap().unwrap(), &b"x"[..]);
        a.close();
        assert!(matches!(r2.recv().await, Err(StreamError::LinkClosed(_))));
    }
}
