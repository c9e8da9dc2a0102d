//! The bytes that open a link connection and each stream on it.
//!
//! A TLS link is carried by two TCP connections, both dialed by the linking site, each running
//! one HTTP/2 session: on the *forward* connection the dialer is the HTTP/2 client, on the
//! *reverse* connection the acceptor is. HTTP/2 lets only clients open streams, so this pair is
//! what lets both sites open streams towards each other. Both connections start with a
//! [`ConnPreface`] carrying the same random session token, which is how the acceptor pairs them.
//!
//! A site that runs several shards (one-thread runtimes, see `site run --shards`) adds a *lane*
//! per further shard once the link is up: another such pair, whose connections each side
//! serves on that shard, so that each shard opens and serves its streams on connections of its
//! own. A lane's connections carry its [`lane_token`] instead of the session token; the
//! acceptor answers a complete lane with [`LANE_READY`] on its forward connection.

/// The byte an accepting router writes on a link connection once the TLS handshake has
/// succeeded on its side. TLS 1.3 lets the client finish before the server has judged the
/// client's certificate, so the dialer waits for this byte: what it reads instead is the
/// server's alert (say, "certificate revoked"), which it can then report.
pub const LINK_ACCEPTED: u8 = 0x5a;

/// The byte an accepting router writes on a lane's forward connection once both of the lane's
/// connections have arrived and the lane is taken: the dialer starts HTTP/2 on them only then.
/// What it reads instead (the connection closed) means the acceptor has no shard for the lane.
pub const LANE_READY: u8 = 0x6c;

/// Most lanes a link may have besides its first connection pair: lane tokens differ from the
/// session token in their last byte.
pub const MAX_LANES: usize = 255;

/// Size of an encoded [`ConnPreface`].
pub const CONN_PREFACE_LEN: usize = 22;

const MAGIC: &[u8; 4] = b"SKIF";
const VERSION: u8 = 1;

/// Which half of a link pair a TLS connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnRole {
    /// The dialer is the HTTP/2 client; it carries the control stream.
    Forward,
    /// The acceptor is the HTTP/2 client.
    Reverse,
    /// A further lane's forward connection (no control stream).
    LaneForward,
    /// A further lane's reverse connection.
    LaneReverse,
}

/// The token that names lane `lane` (1 to [`MAX_LANES`]) of the link session `session`: the
/// session token with its last byte changed, so that the acceptor finds the session from it and
/// pairs the lane's two connections by it.
pub fn lane_token(session: [u8; 16], lane: u8) -> [u8; 16] {
    let mut token = session;
    token[15] ^= lane;
    token
}

/// The first bytes the dialer writes on a link connection after the TLS handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnPreface {
    /// Which half of the pair this connection is.
    pub role: ConnRole,
    /// Random token shared by both halves of one link session (for a lane, its
    /// [`lane_token`]).
    pub session: [u8; 16],
}

/// Why a connection preface was refused (always the peer's fault).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefaceError {
    /// The magic bytes are wrong: this is not a skiff link.
    #[error("not a skiff link connection (bad preface)")]
    BadMagic,
    /// The peer speaks a link protocol version this router does not.
    #[error("unsupported link protocol version {0}")]
    Version(u8),
    /// The role byte is unknown.
    #[error("unknown link connection role {0}")]
    Role(u8),
}

impl ConnPreface {
    /// Encodes the preface.
    pub fn encode(&self) -> [u8; CONN_PREFACE_LEN] {
        let mut out = [0u8; CONN_PREFACE_LEN];
        out[..4].copy_from_slice(MAGIC);
        out[4] = VERSION;
        out[5] = match self.role {
            ConnRole::Forward => 1,
            ConnRole::Reverse => 2,
            ConnRole::LaneForward => 3,
            ConnRole::LaneReverse => 4,
        };
        out[6..].copy_from_slice(&self.session);
        out
    }

    /// Decodes a preface from exactly [`CONN_PREFACE_LEN`] bytes.
    pub fn decode(raw: &[u8; CONN_PREFACE_LEN]) -> Result<Self, PrefaceError> {
        if &raw[..4] != MAGIC {
            return Err(PrefaceError::BadMagic);
        }
        if raw[4] != VERSION {
            return Err(PrefaceError::Version(raw[4]));
        }
        let role = match raw[5] {
            1 => ConnRole::Forward,
            2 => ConnRole::Reverse,
            3 => ConnRole::LaneForward,
            4 => ConnRole::LaneReverse,
            other => return Err(PrefaceError::Role(other)),
        };
        let mut session = [0u8; 16];
        session.copy_from_slice(&raw[6..]);
        Ok(ConnPreface { role, session })
    }
}

/// The first byte of every stream on a link says what the stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// The link's single control stream (opened by the dialer).
    Control,
    /// One carried TCP connection.
    Connection,
}

impl StreamKind {
    /// The byte on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            StreamKind::Control => 1,
            StreamKind::Connection => 2,
        }
    }

    /// Parses the byte on the wire.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(StreamKind::Control),
            2 => Some(StreamKind::Connection),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        for role in [
            ConnRole::Forward,
            ConnRole::Reverse,
            ConnRole::LaneForward,
            ConnRole::LaneReverse,
        ] {
            let p = ConnPreface {
                role,
                session: [7; 16],
            };
            assert_eq!(ConnPreface::decode(&p.encode()), Ok(p));
        }
    }

    #[test]
    fn lane_tokens_differ_from_the_session_and_from_each_other() {
        let session = [9; 16];
        let tokens: std::collections::HashSet<[u8; 16]> = (1..=MAX_LANES as u8)
            .map(|lane| lane_token(session, lane))
            .collect();
        assert_eq!(tokens.len(), MAX_LANES);
        assert!(!tokens.contains(&session));
        assert_eq!(lane_token(session, 0), session);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(raw in any::<[u8; CONN_PREFACE_LEN]>()) {
            let _ = ConnPreface::decode(&raw);
        }
    }

    #[test]
    fn http_and_tls_bytes_are_refused() {
        let mut raw = [0u8; CONN_PREFACE_LEN];
        raw.copy_from_slice(b"GET / HTTP/1.1\r\nHost: ");
        assert_eq!(ConnPreface::decode(&raw), Err(PrefaceError::BadMagic));
    }
}
