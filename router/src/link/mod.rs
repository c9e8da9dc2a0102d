//! Links: transports, and the tasks that bring links up and keep them alive.
//!
//! - [`transport`]: the trait a link's carrier implements (streams with finish and reset);
//! - [`tls`]: TLS over TCP with HTTP/2 streams; [`quic`]: QUIC with native streams;
//! - [`LinkTransport`]: either of them, so that sessions and forwarding are written once;
//! - `dial` / `accept`: how a link comes up on the linking and the accepting side;
//! - `session`: what runs while it is up (heartbeats, RTT, renewal, routing, streams).

pub(crate) mod accept;
mod control;
pub(crate) mod dial;
pub mod quic;
mod session;
pub mod tls;
pub mod transport;

use bytes::Bytes;

use quic::{QuicRecv, QuicSend, QuicTransport};
use tls::{H2Recv, H2Send, TlsTransport};
use transport::{RecvStream, SendStream, StreamError, Transport};

/// This router's hello for a link with routing cost `cost` (both sides send one).
pub(crate) fn hello(config: &crate::Config, cost: u32) -> crate::proto::Message {
    crate::proto::Message::Hello {
        site_id: config.site_id,
        site_name: config.site_name.clone(),
        version: crate::VERSION.into(),
        cost,
    }
}

/// Which transport carries a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// TLS over TCP, HTTP/2 streams.
    Tls,
    /// QUIC.
    Quic,
}

impl TransportKind {
    /// The word used in the CLI and its JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tls => "tls",
            TransportKind::Quic => "quic",
        }
    }
}

/// Which transport a link should use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportChoice {
    /// QUIC first; TLS if QUIC does not get through within 3 s.
    #[default]
    Auto,
    /// TLS only.
    Tls,
    /// QUIC only.
    Quic,
}

impl TransportChoice {
    /// Parses `auto`, `tls` or `quic`.
    pub fn parse(word: &str) -> Option<Self> {
        match word {
            "auto" => Some(TransportChoice::Auto),
            "tls" => Some(TransportChoice::Tls),
            "quic" => Some(TransportChoice::Quic),
            _ => None,
        }
    }

    /// The word for this choice.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportChoice::Auto => "auto",
            TransportChoice::Tls => "tls",
            TransportChoice::Quic => "quic",
        }
    }
}

/// An established link, over either transport.
pub enum LinkTransport {
    /// TLS + HTTP/2.
    Tls(TlsTransport),
    /// QUIC.
    Quic(QuicTransport),
}

impl LinkTransport {
    /// Which transport this is.
    pub fn kind(&self) -> TransportKind {
        match self {
            LinkTransport::Tls(_) => TransportKind::Tls,
            LinkTransport::Quic(_) => TransportKind::Quic,
        }
    }

    /// Hands the streams the peer opens from now on to `handle`, straight from the task that
    /// receives them, where the transport has such a task (TLS: see
    /// [`TlsTransport::hand_streams_to`]). On QUIC, and for streams that arrived before, they
    /// keep coming through [`Transport::accept`].
    pub fn hand_streams_to(&self, handle: impl Fn(AnySend, AnyRecv) + Send + Sync + 'static) {
        if let LinkTransport::Tls(t) = self {
            t.hand_streams_to(Box::new(move |s, r| {
                handle(AnySend::Tls(s), AnyRecv::Tls(r))
            }));
        }
    }
}

/// The sending half of a stream on either transport.
pub enum AnySend {
    /// On a TLS link.
    Tls(H2Send),
    /// On a QUIC link.
    Quic(QuicSend),
}

/// The receiving half of a stream on either transport.
pub enum AnyRecv {
    /// On a TLS link.
    Tls(H2Recv),
    /// On a QUIC link.
    Quic(QuicRecv),
}

impl Transport for LinkTransport {
    type Send = AnySend;
    type Recv = AnyRecv;

    async fn open(&self) -> Result<(AnySend, AnyRecv), StreamError> {
        match self {
            LinkTransport::Tls(t) => t
                .open()
                .await
                .map(|(s, r)| (AnySend::Tls(s), AnyRecv::Tls(r))),
            LinkTransport::Quic(t) => t
                .open()
                .await
                .map(|(s, r)| (AnySend::Quic(s), AnyRecv::Quic(r))),
        }
    }

    async fn accept(&self) -> Option<(AnySend, AnyRecv)> {
        match self {
            LinkTransport::Tls(t) => t
                .accept()
                .await
                .map(|(s, r)| (AnySend::Tls(s), AnyRecv::Tls(r))),
            LinkTransport::Quic(t) => t
                .accept()
                .await
                .map(|(s, r)| (AnySend::Quic(s), AnyRecv::Quic(r))),
        }
    }

    async fn closed(&self) {
        match self {
            LinkTransport::Tls(t) => t.closed().await,
            LinkTransport::Quic(t) => t.closed().await,
        }
    }

    fn close(&self) {
        match self {
            LinkTransport::Tls(t) => t.close(),
            LinkTransport::Quic(t) => t.close(),
        }
    }

    fn received(&self) -> u64 {
        match self {
            LinkTransport::Tls(t) => t.received(),
            LinkTransport::Quic(t) => t.received(),
        }
    }
}

impl SendStream for AnySend {
    async fn send(&mut self, data: Bytes) -> Result<(), StreamError> {
        match self {
            AnySend::Tls(s) => s.send(data).await,
            AnySend::Quic(s) => s.send(data).await,
        }
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        match self {
            AnySend::Tls(s) => s.finish(),
            AnySend::Quic(s) => s.finish(),
        }
    }

    fn reset(&mut self) {
        match self {
            AnySend::Tls(s) => s.reset(),
            AnySend::Quic(s) => s.reset(),
        }
    }

    async fn delivered(&mut self) {
        match self {
            AnySend::Tls(s) => s.delivered().await,
            AnySend::Quic(s) => s.delivered().await,
        }
    }

    fn chunk_size(&self) -> usize {
        match self {
            AnySend::Tls(s) => s.chunk_size(),
            AnySend::Quic(s) => s.chunk_size(),
        }
    }
}

impl RecvStream for AnyRecv {
    async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
        match self {
            AnyRecv::Tls(r) => r.recv().await,
            AnyRecv::Quic(r) => r.recv().await,
        }
    }
}
