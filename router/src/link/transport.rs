//! What the link code needs from a transport, whatever carries it.
//!
//! A transport is an authenticated connection to one peer site on which either side can open
//! bidirectional streams. Each stream half-closes with [`SendStream::finish`] and aborts with
//! [`SendStream::reset`]; the receiving side sees the difference ([`RecvStream::recv`] returns
//! `Ok(None)` for a finish and `Err` for a reset or a dead link). That distinction is what lets a
//! router turn an abort into a TCP RST instead of a clean end of data.

use std::future::Future;

use bytes::Bytes;

/// Why a stream or transport operation failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// The peer reset the stream.
    #[error("stream reset by peer")]
    Reset,
    /// The link under the stream is gone (peer died, network cut, link closed).
    #[error("link closed: {0}")]
    LinkClosed(String),
}

/// The sending half of a stream.
pub trait SendStream: Send + 'static {
    /// Sends `data`, waiting for flow-control credit. Never buffers more than the transport's
    /// bounded window, so a slow reader slows this writer.
    fn send(&mut self, data: Bytes) -> impl Future<Output = Result<(), StreamError>> + Send;
    /// Ends this direction cleanly (a FIN); the other direction stays open.
    fn finish(&mut self) -> Result<(), StreamError>;
    /// Aborts the stream in both directions; the peer sees an error, never a clean end.
    fn reset(&mut self);
    /// After [`SendStream::finish`]: waits until the peer has received everything sent on this
    /// stream, the finish included, as far as the transport can tell — QUIC waits for the
    /// acknowledgement; HTTP/2 has none and returns at once. A router that is about to close
    /// its links (a drained site stopping) must not cut the tail of a finished connection.
    /// Callers bound the wait.
    fn delivered(&mut self) -> impl Future<Output = ()> + Send;
    /// How many bytes of a carried connection to read for one [`SendStream::send`]: what this
    /// transport carries best in one piece.
    fn chunk_size(&self) -> usize;
}

/// The receiving half of a stream.
pub trait RecvStream: Send + 'static {
    /// The next chunk; `Ok(None)` once the peer finished cleanly; `Err` if the stream was reset
    /// or the link died.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, StreamError>> + Send;
}

/// An established link connection to one peer site.
pub trait Transport: Send + Sync + 'static {
    /// The sending half of this transport's streams.
    type Send: SendStream;
    /// The receiving half of this transport's streams.
    type Recv: RecvStream;

    /// Opens a new stream towards the peer.
    fn open(&self) -> impl Future<Output = Result<(Self::Send, Self::Recv), StreamError>> + Send;
    /// Waits for the next stream the peer opened; `None` once the transport is closed.
    fn accept(&self) -> impl Future<Output = Option<(Self::Send, Self::Recv)>> + Send;
    /// Resolves when the transport has died (either side closed it or the connection broke).
    fn closed(&self) -> impl Future<Output = ()> + Send;
    /// Closes the transport; every open stream fails with [`StreamError::LinkClosed`].
    fn close(&self);
    /// A counter that grows whenever the peer's router sends anything on the link (bytes for
    /// TLS, stream frames for QUIC). Liveness checks use it: a peer whose data keeps arriving
    /// is alive even when a busy link delays its heartbeats.
    fn received(&self) -> u64;
}
