//! The TLS link transport: HTTP/2 streams over a pair of mutual-TLS TCP connections.
//!
//! HTTP/2 (the `h2` crate) gives us what a link needs from a multiplexer: per-stream flow
//! control with bounded windows, half-close (END_STREAM) and abort (RST_STREAM) as distinct
//! signals, and connection-level errors that fail every stream instead of ending it cleanly.
//! docs/design.md records why it was chosen over yamux, which cannot tell a reset from a finish.
//!
//! HTTP/2 lets only the client open streams, so a link is two connections, both dialed by the
//! linking site: on the *forward* one the dialer is the client, on the *reverse* one the acceptor
//! is. Each side opens streams on the connection where it is the client ([`ClientHalf`]) and
//! accepts them on the other ([`ServerHalf`]).
//!
//! A site with several shards adds a lane per further shard ([`Lanes`]): another such pair,
//! driven on that shard's thread, on which the shard opens and serves its own streams.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use super::transport::{RecvStream, SendStream, StreamError, Transport};

/// Flow-control window of one stream: how much a sender may have in flight before the receiver
/// has consumed it. Bounds memory per carried connection at the receiving router.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Flow-control window of the whole connection, shared by all its streams: the protocol's
/// maximum. A connection-wide limit would let a few carried connections whose clients stopped
/// reading use up the window and freeze every other stream on the link, the control stream and
/// its heartbeats included. Memory stays bounded by the per-stream window (and the number of
/// streams a link may carry).
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// Largest HTTP/2 frame either side sends; large frames mean fewer headers per byte.
const MAX_FRAME: u32 = 256 * 1024;
/// Most bytes h2 buffers per stream on the sending side before `send` waits.
const SEND_BUFFER: usize = 1024 * 1024;
/// Largest header list either side accepts. skiff's streams carry no headers to speak of (a
/// fixed request line and an empty response); h2's default, 16 MiB, would let a peer make this
/// router buffer that much per stream.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Streams the peer opened that the router has not picked up yet.
const ACCEPT_QUEUE: usize = 1024;
/// Most bytes of a carried connection one DATA frame takes ([`SendStream::chunk_size`]). The
/// size leaves room for the frame's 9-byte header, so that a full chunk fills exactly three
/// 16 KiB TLS records (a 9-byte record left behind costs its own encryption and `writev`).
/// Three records, about 48 KiB on the wire, fit in one 64 KiB TCP segment as the kernel hands
/// it to the device (loopback's MTU, and the GSO/TSO limit on a NIC). Eight records (128 KiB)
/// made three segments of one write, the last a few hundred bytes long, and each such runt
/// cost a wake-up and a record split across two reads at the receiving router: three records
/// instead of eight cut the routers' CPU per GB carried by a sixth and raised a single
/// stream's throughput by as much (docs/performance.md).
const SEND_CHUNK: usize = 3 * TLS_RECORD - HTTP2_FRAME_HEADER;
/// Most plaintext one TLS record carries.
const TLS_RECORD: usize = 16 * 1024;
/// An HTTP/2 frame header.
const HTTP2_FRAME_HEADER: usize = 9;

/// What a link does with each stream its peer opens, once it says so
/// ([`TlsTransport::hand_streams_to`]). It runs on the task that drives the connection, so it
/// must return at once (it spawns what serves the stream).
pub type StreamHandler = Box<dyn Fn(H2Send, H2Recv) + Send + Sync>;

/// Where a [`ServerHalf`]'s driver finds the [`StreamHandler`], if one is set.
type HandlerSlot = Arc<std::sync::Mutex<Option<StreamHandler>>>;
/// Read buffer under TLS on a link's TCP connection. rustls reads from its socket at most what
/// completes the record it is assembling (4 KiB when its buffer has just been emptied), so every
/// 16 KiB record cost at least one `recvfrom`; with this buffer one call takes in up to sixteen
/// records. It is per link connection, not per carried connection, and only once the link is
/// up (see [`ready_for_traffic`]).
pub const READ_BUFFER: usize = 256 * 1024;

/// Most encrypted bytes rustls holds for the socket on a link connection (its default is
/// 64 KiB). Chosen when a full read from a carried connection was 128 KiB, so that its HTTP/2
/// DATA frame went to the socket in one `writev` instead of two; a full chunk of a carried
/// connection now (48 KiB, [`SendStream::chunk_size`]) fits the default as well, and this
/// bounds what waits in rustls while the socket is full.
pub const SEND_TLS_BUFFER: usize = 256 * 1024;

/// A connection to or from the link port as TLS sees it: the socket, with a read buffer under
/// rustls once the connection carries a link ([`ready_for_traffic`]). Until then every read
/// goes straight to the socket, so a handshake or a token redemption (which any stranger who
/// reaches the port can start, up to `--max-handshakes` at once) costs no buffer. tokio's
/// `BufReader` cannot do that: its buffer is allocated when it is made, before the handshake
/// that the stream's type is fixed by.
pub struct LinkTcp {
    tcp: tokio::net::TcpStream,
    /// Empty until the link is up.
    buf: Box<[u8]>,
    /// `buf[pos..filled]` is read from the socket and not yet handed on.
    pos: usize,
    filled: usize,
}

impl LinkTcp {
    /// Wraps a connected socket, unbuffered.
    pub fn new(tcp: tokio::net::TcpStream) -> Self {
        LinkTcp {
            tcp,
            buf: Box::default(),
            pos: 0,
            filled: 0,
        }
    }

    /// The socket.
    pub fn get_ref(&self) -> &tokio::net::TcpStream {
        &self.tcp
    }

    /// The socket back; bytes read into the buffer and not handed on are dropped.
    pub fn into_inner(self) -> tokio::net::TcpStream {
        self.tcp
    }

    /// How many bytes the read buffer holds (0 before [`ready_for_traffic`]).
    pub fn read_buffer_capacity(&self) -> usize {
        self.buf.len()
    }

    /// Moves the socket to the I/O driver of the runtime this is called on: a connection
    /// accepted on one shard and served on another must be woken by the other's driver. tokio
    /// cannot move a registration, so the socket is registered anew under a duplicate of its
    /// descriptor, and the old one is dropped (which ends its registration). Buffered bytes
    /// stay.
    pub fn rehome(&mut self) -> std::io::Result<()> {
        use std::os::fd::AsFd;
        let fd = self.tcp.as_fd().try_clone_to_owned()?;
        let moved = tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd))?;
        drop(std::mem::replace(&mut self.tcp, moved));
        Ok(())
    }
}

/// Readies a link connection whose handshake is done for carried traffic: the read buffer
/// under TLS ([`READ_BUFFER`]) and rustls' larger send buffer ([`SEND_TLS_BUFFER`]).
pub fn ready_for_traffic<C, D>(io: &mut LinkTcp, tls: &mut C)
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    if io.buf.is_empty() {
        io.buf = vec![0; READ_BUFFER].into_boxed_slice();
    }
    tls.set_buffer_limit(Some(SEND_TLS_BUFFER));
}

impl AsyncRead for LinkTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.filled {
            // Nothing buffered. A read at least as large as the buffer (and every read before
            // the buffer exists) goes straight to the socket.
            if this.buf.len() <= out.remaining() {
                return Pin::new(&mut this.tcp).poll_read(cx, out);
            }
            let mut fill = ReadBuf::new(&mut this.buf);
            std::task::ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut fill))?;
            this.filled = fill.filled().len();
            this.pos = 0;
        }
        let n = (this.filled - this.pos).min(out.remaining());
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for LinkTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The half of a link on which this router is the HTTP/2 client: it opens streams here.
pub struct ClientHalf {
    send_request: h2::client::SendRequest<Bytes>,
    received: Arc<AtomicU64>,
}

impl ClientHalf {
    /// Runs the HTTP/2 client handshake on `io` and spawns the connection driver, which cancels
    /// `dead` when the connection ends.
    pub async fn start<T>(io: T, dead: CancellationToken) -> Result<Self, StreamError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let received = Arc::new(AtomicU64::new(0));
        let io = Counting {
            inner: io,
            read: received.clone(),
        };
        let (send_request, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(link_closed)?;
        tokio::spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "link connection (client half) ended");
                    }
                }
                _ = dead.cancelled() => {}
            }
            dead.cancel();
        });
        Ok(ClientHalf {
            send_request,
            received,
        })
    }

    /// Opens a stream.
    pub async fn open(&self) -> Result<(H2Send, H2Recv), StreamError> {
        let mut send_request = self
            .send_request
            .clone()
            .ready()
            .await
            .map_err(stream_error)?;
        // A fixed request: the stream's first bytes say what it carries.
        let mut request = http::Request::new(());
        *request.uri_mut() = http::Uri::from_static("http://skiff/");
        let (response, send) = send_request
            .send_request(request, false)
            .map_err(stream_error)?;
        Ok((
            H2Send {
                state: SendState::Open(send),
            },
            H2Recv {
                state: RecvState::Waiting(response),
            },
        ))
    }
}

/// The half of a link on which this router is the HTTP/2 server: it accepts streams here.
pub struct ServerHalf {
    incoming: Mutex<mpsc::Receiver<(H2Send, H2Recv)>>,
    /// For the server halves of the link's further lanes, which queue into the same
    /// `incoming` (weak, so that `accept` still ends when the connection does).
    queue: mpsc::WeakSender<(H2Send, H2Recv)>,
    received: Arc<AtomicU64>,
    handler: HandlerSlot,
}

impl ServerHalf {
    /// Runs the HTTP/2 server handshake on `io` and spawns the task that drives the connection
    /// and queues the streams the peer opens; it cancels `dead` when the connection ends. The
    /// peer may have at most `max_streams` streams open at once (SETTINGS_MAX_CONCURRENT_STREAMS;
    /// HTTP/2 refuses more with RST_STREAM REFUSED_STREAM).
    pub async fn start<T>(
        io: T,
        max_streams: u32,
        dead: CancellationToken,
    ) -> Result<Self, StreamError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let handler = HandlerSlot::default();
        let received = Arc::new(AtomicU64::new(0));
        let queue = tx.downgrade();
        serve(io, max_streams, dead, tx, handler.clone(), received.clone()).await?;
        Ok(ServerHalf {
            incoming: Mutex::new(rx),
            queue,
            received,
            handler,
        })
    }

    /// The next stream the peer opened, `None` once the connection is gone.
    pub async fn accept(&self) -> Option<(H2Send, H2Recv)> {
        self.incoming.lock().await.recv().await
    }
}

/// Runs the HTTP/2 server handshake on `io` and spawns the task that drives the connection and
/// hands the streams the peer opens to the handler in `slot`, or queues them on `tx`.
async fn serve<T>(
    io: T,
    max_streams: u32,
    dead: CancellationToken,
    tx: mpsc::Sender<(H2Send, H2Recv)>,
    slot: HandlerSlot,
    received: Arc<AtomicU64>,
) -> Result<(), StreamError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = Counting {
        inner: io,
        read: received.clone(),
    };
    let mut connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(max_streams)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(link_closed)?;
    tokio::spawn(async move {
        // `accept` also drives the connection's I/O, so this loop must keep polling it. A
        // handler, once set, takes each stream at once (it spawns a task). Until then the
        // queue is bounded and its consumer only spawns a task per stream, so waiting on a
        // full queue is brief and is exactly the backpressure we want.
        loop {
            let next = tokio::select! {
                next = connection.accept() => next,
                _ = dead.cancelled() => break,
            };
            match next {
                Some(Ok((request, respond))) => {
                    let pair = (
                        H2Send {
                            state: SendState::Unanswered(respond),
                        },
                        H2Recv {
                            state: RecvState::Ready(request.into_body()),
                        },
                    );
                    let pair = {
                        let handler = slot.lock().unwrap_or_else(|e| e.into_inner());
                        match handler.as_ref() {
                            Some(handle) => {
                                handle(pair.0, pair.1);
                                continue;
                            }
                            None => pair,
                        }
                    };
                    if tx.send(pair).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "link connection (server half) failed");
                    break;
                }
                None => break,
            }
        }
        dead.cancel();
    });
    Ok(())
}

/// A link carried by a client half and a server half (see the module docs), and the further
/// lanes of a site with several shards.
pub struct TlsTransport {
    client: ClientHalf,
    server: ServerHalf,
    lanes: Arc<Lanes>,
    dead: CancellationToken,
}

/// A link's further lanes, one per shard that has one: the client half each shard opens its
/// streams on. Lanes come up after the link ([`Lanes::add`]) and live as long as it: the end of
/// any of their connections ends the link, as the end of its first pair does.
pub struct Lanes {
    /// By shard; shard 0 (and any shard without a lane) uses the link's first pair.
    clients: Box<[OnceLock<ClientHalf>]>,
    queue: mpsc::WeakSender<(H2Send, H2Recv)>,
    handler: HandlerSlot,
    /// The link's token (see [`TlsTransport::new`]).
    dead: CancellationToken,
    /// Set to how many lanes are up (`skiff_link_lanes`): a series the session drops when the
    /// link ends stays dropped, as a gauge removed from its family is no longer exported.
    up: Gauge,
}

impl Lanes {
    /// The lanes a link may add for a site of `shards` shards, whose first pair's server half
    /// is `server` (lanes hand the streams the peer opens to where it does) and whose token is
    /// `dead`. `up` counts the lanes that are up.
    pub fn new(
        server: &ServerHalf,
        dead: CancellationToken,
        shards: usize,
        up: Gauge,
    ) -> Arc<Self> {
        Arc::new(Lanes {
            clients: (0..shards.max(1)).map(|_| OnceLock::new()).collect(),
            queue: server.queue.clone(),
            handler: server.handler.clone(),
            dead,
            up,
        })
    }

    /// Starts lane `shard`'s halves on the runtime this is called on, which must be that
    /// shard's: HTTP/2 as the client on `client_io` and as the server on `server_io` (the
    /// peer may open `max_streams` streams there). Streams the peer opens on the lane go where
    /// those of the link's first pair go. An error if the shard has a lane already, if there
    /// is no such shard, or if the link is gone.
    pub async fn add<C, S>(
        &self,
        shard: usize,
        client_io: C,
        server_io: S,
        max_streams: u32,
    ) -> Result<(), StreamError>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let slot = match self.clients.get(shard) {
            Some(slot) if shard > 0 && slot.get().is_none() => slot,
            _ => return Err(StreamError::LinkClosed(format!("no room for lane {shard}"))),
        };
        let Some(queue) = self.queue.upgrade() else {
            return Err(StreamError::LinkClosed("link is down".into()));
        };
        let received = Arc::new(AtomicU64::new(0));
        // Both at once: each side's server half waits for the other side's client preface.
        let (client, served) = tokio::join!(
            ClientHalf::start(client_io, self.dead.clone()),
            serve(
                server_io,
                max_streams,
                self.dead.clone(),
                queue,
                self.handler.clone(),
                received,
            )
        );
        served?;
        slot.set(client?)
            .map_err(|_| StreamError::LinkClosed(format!("lane {shard} is up already")))?;
        self.up.set(self.up() as i64);
        Ok(())
    }

    /// How many lanes are up.
    pub fn up(&self) -> usize {
        self.clients.iter().filter(|c| c.get().is_some()).count()
    }

    /// Whether the link has ended.
    pub fn is_dead(&self) -> bool {
        self.dead.is_cancelled()
    }
}

impl TlsTransport {
    /// Assembles a transport without lanes; `dead` must be the token both halves were started
    /// with.
    pub fn new(client: ClientHalf, server: ServerHalf, dead: CancellationToken) -> Self {
        let lanes = Lanes::new(&server, dead, 1, Gauge::default());
        TlsTransport::with_lanes(client, server, lanes)
    }

    /// Assembles a transport whose further lanes are `lanes` (made with `server` and the token
    /// both halves were started with), which may come up before or after this.
    pub fn with_lanes(client: ClientHalf, server: ServerHalf, lanes: Arc<Lanes>) -> Self {
        TlsTransport {
            client,
            server,
            dead: lanes.dead.clone(),
            lanes,
        }
    }

    /// The link's further lanes, to add to.
    pub fn lanes(&self) -> Arc<Lanes> {
        self.lanes.clone()
    }
}

impl TlsTransport {
    /// Hands every stream the peer opens from now on to `handle`, on the task that drives the
    /// connection, instead of queueing it for [`Transport::accept`]: the stream reaches the
    /// task that serves it one task hand-off sooner. Streams queued before stay queued for
    /// `accept`, which also still reports the connection's end. [`Transport::close`] drops the
    /// handler (and what it holds).
    pub fn hand_streams_to(&self, handle: StreamHandler) {
        *self
            .server
            .handler
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(handle);
    }

    fn drop_handler(&self) {
        let mut slot = self
            .server
            .handler
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let handler = slot.take();
        drop(slot);
        // Dropped outside the lock: it may hold much.
        drop(handler);
    }
}

impl Drop for TlsTransport {
    fn drop(&mut self) {
        // Dropping the transport must not leave connection drivers running with nobody to use
        // them: cancelling makes both drivers drop their connections, which fails every stream.
        self.dead.cancel();
        self.drop_handler();
    }
}

impl Transport for TlsTransport {
    type Send = H2Send;
    type Recv = H2Recv;

    async fn open(&self) -> Result<(H2Send, H2Recv), StreamError> {
        if self.dead.is_cancelled() {
            return Err(StreamError::LinkClosed("link is down".into()));
        }
        let lane = self.lanes.clients.get(crate::shard::current());
        lane.and_then(OnceLock::get)
            .unwrap_or(&self.client)
            .open()
            .await
    }

    async fn accept(&self) -> Option<(H2Send, H2Recv)> {
        tokio::select! {
            next = self.server.accept() => next,
            _ = self.dead.cancelled() => None,
        }
    }

    async fn closed(&self) {
        self.dead.cancelled().await
    }

    fn close(&self) {
        self.dead.cancel();
        self.drop_handler();
    }

    fn received(&self) -> u64 {
        self.client.received.load(Ordering::Relaxed) + self.server.received.load(Ordering::Relaxed)
    }
}

/// Passes I/O through and counts the bytes read (for liveness: see `Transport::received`).
struct Counting<T> {
    inner: T,
    read: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let n = buf.filled().len() - before;
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The sending half of an HTTP/2 stream.
pub struct H2Send {
    state: SendState,
}

enum SendState {
    /// A stream the peer opened that this side has not answered yet. The response headers wait
    /// for the first bytes (or the finish, or the reset), so that they leave in the same write
    /// and the same TLS record: a carried connection's destination answers its opening with
    /// the connect result, and the origin then wakes once for both instead of twice.
    Unanswered(h2::server::SendResponse<Bytes>),
    Open(h2::SendStream<Bytes>),
    /// Answering failed; the error is what the stream's operations report.
    Failed(StreamError),
}

impl H2Send {
    /// The stream to send on, answering the peer's request first if that is still to do
    /// (with `end_of_stream`, the answer also ends this direction).
    fn answer(&mut self, end_of_stream: bool) -> Result<&mut h2::SendStream<Bytes>, StreamError> {
        if let SendState::Unanswered(respond) = &mut self.state {
            self.state = match respond.send_response(http::Response::new(()), end_of_stream) {
                Ok(send) => SendState::Open(send),
                Err(e) => SendState::Failed(stream_error(e)),
            };
        }
        match &mut self.state {
            SendState::Open(send) => Ok(send),
            SendState::Failed(e) => Err(e.clone()),
            SendState::Unanswered(_) => unreachable!("answered just above"),
        }
    }
}

impl SendStream for H2Send {
    async fn send(&mut self, mut data: Bytes) -> Result<(), StreamError> {
        let inner = self.answer(false)?;
        while !data.is_empty() {
            inner.reserve_capacity(data.len());
            let granted = poll_fn(|cx| inner.poll_capacity(cx))
                .await
                .ok_or_else(|| StreamError::LinkClosed("stream closed while sending".into()))?
                .map_err(stream_error)?;
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            inner.send_data(chunk, false).map_err(stream_error)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        if matches!(self.state, SendState::Unanswered(_)) {
            // Nothing was sent: the answer itself ends this direction.
            return self.answer(true).map(|_| ());
        }
        self.answer(false)?
            .send_data(Bytes::new(), true)
            .map_err(stream_error)
    }

    fn reset(&mut self) {
        match &mut self.state {
            SendState::Unanswered(respond) => respond.send_reset(h2::Reason::CANCEL),
            SendState::Open(send) => send.send_reset(h2::Reason::CANCEL),
            SendState::Failed(_) => {}
        }
    }

    async fn delivered(&mut self) {
        // HTTP/2 acknowledges nothing per stream: once queued, the frames are the
        // connection's to deliver.
    }

    fn chunk_size(&self) -> usize {
        SEND_CHUNK
    }
}

enum RecvState {
    /// The client side's stream before the server's response headers arrived.
    Waiting(h2::client::ResponseFuture),
    Ready(h2::RecvStream),
}

/// The receiving half of an HTTP/2 stream.
pub struct H2Recv {
    state: RecvState,
}

impl RecvStream for H2Recv {
    async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
        if let RecvState::Waiting(response) = &mut self.state {
            let body = response.await.map_err(stream_error)?.into_body();
            self.state = RecvState::Ready(body);
        }
        let RecvState::Ready(body) = &mut self.state else {
            unreachable!("set just above");
        };
        loop {
            match body.data().await {
                // The END_STREAM flag may ride on an empty DATA frame; that is not a chunk.
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => {
                    // Credit is returned as soon as the chunk leaves h2: the caller writes it
                    // out before asking for the next one, so at most one window plus one chunk
                    // is held.
                    let _ = body.flow_control().release_capacity(chunk.len());
                    return Ok(Some(chunk));
                }
                Some(Err(e)) => return Err(stream_error(e)),
                None => return Ok(None),
            }
        }
    }
}

fn stream_error(e: h2::Error) -> StreamError {
    if e.is_reset() {
        StreamError::Reset
    } else {
        link_closed(e)
    }
}

fn link_closed(e: h2::Error) -> StreamError {
    StreamError::LinkClosed(e.to_string())
}

/// Test support: a link's lanes for a site of `shards` shards, made with the server half of a
/// first pair in memory, which is returned too, to be kept while the lanes are used.
#[cfg(test)]
pub(crate) async fn lanes_in_memory(shards: usize) -> (Arc<Lanes>, (ServerHalf, ClientHalf)) {
    let (a, b) = tokio::io::duplex(1 << 16);
    let dead = CancellationToken::new();
    let (server, client) = tokio::join!(
        ServerHalf::start(a, 10, dead.clone()),
        ClientHalf::start(b, CancellationToken::new()),
    );
    let (server, client) = (server.unwrap(), client.unwrap());
    let lanes = Lanes::new(&server, dead, shards, Gauge::default());
    (lanes, (server, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two routers' transports wired together in memory (no sockets, no TLS).
    async fn pair() -> (TlsTransport, TlsTransport) {
        pair_with(1).await
    }

    /// [`pair`], for sites with `shards` shards.
    async fn pair_with(shards: usize) -> (TlsTransport, TlsTransport) {
        let (fwd_a, fwd_b) = tokio::io::duplex(1 << 20);
        let (rev_a, rev_b) = tokio::io::duplex(1 << 20);
        let (dead_a, dead_b) = (CancellationToken::new(), CancellationToken::new());
        let (ca, sb, cb, sa) = tokio::join!(
            ClientHalf::start(fwd_a, dead_a.clone()),
            ServerHalf::start(fwd_b, 1000, dead_b.clone()),
            ClientHalf::start(rev_b, dead_b.clone()),
            ServerHalf::start(rev_a, 1000, dead_a.clone()),
        );
        let (sa, sb) = (sa.unwrap(), sb.unwrap());
        let lanes_a = Lanes::new(&sa, dead_a, shards, Gauge::default());
        let lanes_b = Lanes::new(&sb, dead_b, shards, Gauge::default());
        (
            TlsTransport::with_lanes(ca.unwrap(), sa, lanes_a),
            TlsTransport::with_lanes(cb.unwrap(), sb, lanes_b),
        )
    }

    #[tokio::test]
    async fn both_sides_open_streams_and_half_close_is_preserved() {
        let (a, b) = pair().await;
        for (opener, acceptor) in [(&a, &b), (&b, &a)] {
            let (mut s1, mut r1) = opener.open().await.unwrap();
            s1.send(Bytes::from_static(b"ping")).await.unwrap();
            s1.finish().unwrap();
            let (mut s2, mut r2) = acceptor.accept().await.unwrap();
            assert_eq!(r2.recv().await.unwrap().unwrap(), &b"ping"[..]);
            assert_eq!(r2.recv().await.unwrap(), None, "finish is a clean end");
            // The other direction still works after the first one finished.
            s2.send(Bytes::from_static(b"pong")).await.unwrap();
            s2.finish().unwrap();
            assert_eq!(r1.recv().await.unwrap().unwrap(), &b"pong"[..]);
            assert_eq!(r1.recv().await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn a_stream_handler_gets_new_streams_until_the_link_closes() {
        let wait = |what| {
            move |r: Result<_, tokio::time::error::Elapsed>| r.unwrap_or_else(|_| panic!("{what}"))
        };
        let limit = std::time::Duration::from_secs(10);
        let (a, b) = pair().await;
        // Without a handler, streams wait for `accept`.
        let (mut s0, _r0) = a.open().await.unwrap();
        s0.send(Bytes::from_static(b"queued")).await.unwrap();
        let (_s, mut r) = wait("accept")(tokio::time::timeout(limit, b.accept()).await).unwrap();
        assert_eq!(r.recv().await.unwrap().unwrap(), &b"queued"[..]);
        let (tx, mut handled) = mpsc::unbounded_channel();
        let held = Arc::new(());
        let in_handler = held.clone();
        b.hand_streams_to(Box::new(move |send, recv| {
            let _ = &in_handler;
            let _ = tx.send((send, recv));
        }));
        let (mut s1, mut r1) = a.open().await.unwrap();
        s1.send(Bytes::from_static(b"ping")).await.unwrap();
        let handed = tokio::time::timeout(limit, handled.recv()).await;
        let (mut s2, mut r2) = wait("the handler got the stream")(handed).unwrap();
        assert_eq!(r2.recv().await.unwrap().unwrap(), &b"ping"[..]);
        s2.send(Bytes::from_static(b"pong")).await.unwrap();
        assert_eq!(r1.recv().await.unwrap().unwrap(), &b"pong"[..]);
        // Handed over, not also queued.
        let short = std::time::Duration::from_millis(200);
        assert!(tokio::time::timeout(short, b.accept()).await.is_err());
        // Closing drops the handler and what it holds (the router's state, in a router).
        assert_eq!(Arc::strong_count(&held), 2);
        b.close();
        assert_eq!(Arc::strong_count(&held), 1);
        assert!(b.accept().await.is_none(), "accept reports the end");
    }

    #[tokio::test]
    async fn reset_is_not_a_clean_end() {
        let (a, b) = pair().await;
        let (mut s1, _r1) = a.open().await.unwrap();
        s1.send(Bytes::from_static(b"partial")).await.unwrap();
        let (_s2, mut r2) = b.accept().await.unwrap();
        assert_eq!(r2.recv().await.unwrap().unwrap(), &b"partial"[..]);
        s1.reset();
        assert_eq!(r2.recv().await, Err(StreamError::Reset));
    }

    #[tokio::test]
    async fn link_connections_buffer_reads_only_once_ready_for_traffic() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (peer, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (mut peer, mut io) = (peer.unwrap(), LinkTcp::new(accepted.unwrap().0));
        // A handshake, or anything a stranger starts on the link port, costs no buffer.
        assert_eq!(io.read_buffer_capacity(), 0);
        peer.write_all(b"hello").await.unwrap();
        let mut small = [0u8; 5];
        io.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"hello");

        let client = rustls::ClientConfig::builder_with_provider(skiff_certs::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("skiff").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        ready_for_traffic(&mut io, &mut conn);
        assert_eq!(io.read_buffer_capacity(), READ_BUFFER);
        // Reads smaller than the buffer see every byte, in order, across many socket reads.
        let sent: Vec<u8> = (0..3 * READ_BUFFER).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move { peer.write_all(&sent).await.unwrap() })
        };
        let mut got = vec![0u8; sent.len()];
        for piece in got.chunks_mut(4096 + 7) {
            io.read_exact(piece).await.unwrap();
        }
        writer.await.unwrap();
        assert_eq!(got, sent);
        // The peer's end is an end here too.
        assert_eq!(io.read(&mut small).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_acceptor_may_finish_or_reset_before_sending_anything() {
        let (a, b) = pair().await;
        // The answer waits for the acceptor's first bytes; a finish or a reset answers alone.
        let (mut s1, mut r1) = a.open().await.unwrap();
        s1.send(Bytes::from_static(b"hello")).await.unwrap();
        let (mut s2, _r2) = b.accept().await.unwrap();
        s2.finish().unwrap();
        assert_eq!(r1.recv().await.unwrap(), None, "a finish is a clean end");

        let (mut s1, mut r1) = a.open().await.unwrap();
        s1.send(Bytes::from_static(b"hello")).await.unwrap();
        let (mut s2, _r2) = b.accept().await.unwrap();
        s2.reset();
        assert_eq!(r1.recv().await, Err(StreamError::Reset));
    }

    #[tokio::test]
    async fn a_dead_link_fails_open_streams() {
        let (a, b) = pair().await;
        let (mut s1, _r1) = a.open().await.unwrap();
        s1.send(Bytes::from_static(b"x")).await.unwrap();
        let (_s2, mut r2) = b.accept().await.unwrap();
        assert_eq!(r2.recv().await.unwrap().unwrap(), &b"x"[..]);
        drop(a);
        assert!(matches!(r2.recv().await, Err(StreamError::LinkClosed(_))));
        b.closed().await;
    }

    #[tokio::test]
    async fn a_full_chunk_is_one_frame_of_three_whole_records_within_one_segment() {
        // TLS 1.3 adds a 5-byte header, the content type and a 16-byte tag to each record;
        // loopback's largest TCP segment carries 65,483 bytes (a NIC's GSO/TSO about as many).
        const RECORD_OVERHEAD: usize = 5 + 1 + 16;
        const SEGMENT: usize = 65_483;
        let frame = SEND_CHUNK + HTTP2_FRAME_HEADER;
        assert_eq!(
            frame % TLS_RECORD,
            0,
            "a full chunk's frame fills whole records"
        );
        let records = frame / TLS_RECORD;
        assert!(frame + records * RECORD_OVERHEAD <= SEGMENT);

        let (a, b) = pair().await;
        let (mut s1, _r1) = a.open().await.unwrap();
        assert_eq!(s1.chunk_size(), SEND_CHUNK);
        s1.send(Bytes::from_static(b"x")).await.unwrap();
        let (_s2, mut r2) = b.accept().await.unwrap();
        assert_eq!(r2.recv().await.unwrap().unwrap(), &b"x"[..]);
        let before = b.received();
        s1.send(Bytes::from(vec![7u8; SEND_CHUNK])).await.unwrap();
        let chunk = r2.recv().await.unwrap().unwrap();
        assert_eq!(
            chunk.len(),
            SEND_CHUNK,
            "the chunk arrives whole, in one DATA frame"
        );
        assert_eq!(
            b.received() - before,
            frame as u64,
            "one frame header, nothing else"
        );
    }

    /// A connected pair of loopback sockets on the current runtime, and a second handle to
    /// the first socket, to cut the connection from outside.
    async fn tcp_pair() -> (
        tokio::net::TcpStream,
        tokio::net::TcpStream,
        std::net::TcpStream,
    ) {
        use std::os::fd::AsFd;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let a = a.unwrap();
        let cut = std::net::TcpStream::from(a.as_fd().try_clone_to_owned().unwrap());
        (a, b.unwrap().0, cut)
    }

    #[test]
    fn a_shard_opens_its_streams_on_its_lane_and_a_lost_lane_ends_the_link() {
        let limit = std::time::Duration::from_secs(10);
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let main = runtime();
        let (a, b) = main.block_on(pair_with(2));
        let (a, b) = (Arc::new(a), Arc::new(b));
        let (lane_a, lane_b) = (a.lanes(), b.lanes());
        // Shard 1: a thread of its own with a one-thread runtime, as `site run --shards 2`.
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shard = std::thread::spawn(move || {
            crate::shard::enter(1);
            runtime().block_on(async move {
                let (fwd_a, fwd_b, cut) = tcp_pair().await;
                let (rev_a, rev_b, _) = tcp_pair().await;
                let lane_read = Arc::new(AtomicU64::new(0));
                let fwd_b = Counting {
                    inner: fwd_b,
                    read: lane_read.clone(),
                };
                // a dialed: it is the HTTP/2 client on the forward connection.
                let (added_a, added_b) = tokio::join!(
                    lane_a.add(1, fwd_a, rev_a, 1000),
                    lane_b.add(1, rev_b, fwd_b, 1000),
                );
                added_a.unwrap();
                added_b.unwrap();
                assert_eq!((lane_a.up(), lane_b.up()), (1, 1));
                // A shard has one lane at most.
                let (x, y) = tokio::io::duplex(64);
                assert!(lane_a.add(1, x, y, 1).await.is_err());
                tx.send((cut, lane_read)).unwrap();
                let _ = stopped.await;
            });
        });
        let (cut, lane_read) = rx.recv().unwrap();
        let (a1, b1) = (a.clone(), b.clone());
        // A stream opened on shard 1 goes over the lane: the link's first pair sees none of it
        // (once its own handshake is over: its drivers run on `main`).
        main.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(100)).await });
        let first_pair_before = b.received();
        let lane_before = lane_read.load(Ordering::Relaxed);
        let opened = std::thread::spawn(move || {
            crate::shard::enter(1);
            runtime().block_on(async move {
                let exchange = async {
                    let (mut send, mut recv) = a1.open().await.unwrap();
                    send.send(Bytes::from_static(b"over the lane"))
                        .await
                        .unwrap();
                    send.finish().unwrap();
                    recv.recv().await.unwrap().unwrap()
                };
                // The answer comes over the lane, which shard 1 drives while `main` does not.
                tokio::time::timeout(limit, exchange)
                    .await
                    .expect("the answer arrives")
            })
        });
        main.block_on(async {
            let (mut send, mut recv) = tokio::time::timeout(limit, b1.accept())
                .await
                .expect("the stream arrives")
                .unwrap();
            assert_eq!(recv.recv().await.unwrap().unwrap(), &b"over the lane"[..]);
            send.send(Bytes::from_static(b"and back")).await.unwrap();
            send.finish().unwrap();
        });
        assert_eq!(opened.join().unwrap(), &b"and back"[..]);
        assert_eq!(b.received(), first_pair_before, "nothing on the first pair");
        assert!(lane_read.load(Ordering::Relaxed) - lane_before >= 13);
        // Losing a lane's connection ends the link, as losing the first pair does.
        cut.shutdown(std::net::Shutdown::Both).unwrap();
        main.block_on(async {
            tokio::time::timeout(limit, a.closed())
                .await
                .expect("the link ends with its lane");
        });
        let _ = stop.send(());
        shard.join().unwrap();
    }

    #[tokio::test]
    async fn a_slow_reader_bounds_what_the_sender_buffers() {
        let (a, b) = pair().await;
        let (mut s1, _r1) = a.open().await.unwrap();
        s1.send(Bytes::from_static(b"x")).await.unwrap();
        let (_s2, _r2) = b.accept().await.unwrap();
        // Nobody reads on b: the sender must stall once window and send buffer are used up.
        let chunk = Bytes::from(vec![0u8; 64 * 1024]);
        let mut total = 0usize;
        let stalled = tokio::time::timeout(std::time::Duration::from_millis(500), async {
            while total < 64 * 1024 * 1024 {
                s1.send(chunk.clone()).await.unwrap();
                total += chunk.len();
            }
        })
        .await
        .is_err();
        assert!(stalled, "sender pushed {total} bytes with nobody reading");
        assert!(total <= (STREAM_WINDOW as usize) + SEND_BUFFER + chunk.len());
    }
}
