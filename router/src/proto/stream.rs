//! The header that opens each carried connection's stream, and the destination's answer.
//!
//! After the stream-kind byte, the opener writes a [`StreamHeader`]: `u16` big-endian length,
//! then the routing key (`u16` length + UTF-8), origin site (16 bytes), destination site (16
//! bytes), connection id (`u64`) and hops left (`u8`). The destination (or a transit router that cannot go on)
//! answers with a [`ConnectResult`]: one status byte and a `u16`-length UTF-8 detail. Raw bytes
//! follow in both directions.

use bytes::{Buf, BufMut, BytesMut};
use uuid::Uuid;

use super::message::DecodeError;

/// Longest routing key.
pub const MAX_KEY_LEN: usize = 253;
/// Longest encoded header body.
pub const MAX_HEADER_LEN: usize = 2 + MAX_KEY_LEN + 16 + 16 + 8 + 1;
/// Hops a new connection may take before routers give up on it (a guard against loops while
/// routing converges).
pub const DEFAULT_TTL: u8 = 32;
/// Longest connect-result detail.
pub const MAX_DETAIL_LEN: usize = 1024;

/// Where a carried connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// The service's routing key.
    pub routing_key: String,
    /// The site whose listener accepted the client.
    pub origin: Uuid,
    /// The site whose connector should serve it.
    pub destination: Uuid,
    /// Connection id chosen by the origin (for logs).
    pub connection_id: u64,
    /// Hops left; a transit router with 0 left answers [`ConnectStatus::Unreachable`].
    pub ttl: u8,
}

/// How a connection attempt ended at the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectStatus {
    /// Connected: bytes flow from now on.
    Ok,
    /// The destination's backend refused or could not be reached.
    Refused,
    /// The destination serves no such routing key (any more).
    NoTarget,
    /// A router on the path has no route to the destination.
    Unreachable,
}

/// The destination's answer to a [`StreamHeader`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectResult {
    /// The outcome.
    pub status: ConnectStatus,
    /// Details for logs (empty when connected).
    pub detail: String,
}

impl StreamHeader {
    /// Appends the encoded header to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let key = truncate(&self.routing_key, MAX_KEY_LEN);
        out.put_u16((2 + key.len() + 16 + 16 + 8 + 1) as u16);
        out.put_u16(key.len() as u16);
        out.put_slice(key.as_bytes());
        out.put_slice(self.origin.as_bytes());
        out.put_slice(self.destination.as_bytes());
        out.put_u64(self.connection_id);
        out.put_u8(self.ttl);
    }

    /// Decodes a header from the front of `buf`, consuming it; `Ok(None)` if incomplete.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, DecodeError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
        if len > MAX_HEADER_LEN {
            return Err(DecodeError::TooLong(len));
        }
        if buf.len() < 2 + len {
            return Ok(None);
        }
        buf.advance(2);
        let mut body = buf.split_to(len);
        if body.remaining() < 2 {
            return Err(DecodeError::Truncated);
        }
        let key_len = body.get_u16() as usize;
        if key_len > MAX_KEY_LEN || body.remaining() != key_len + 16 + 16 + 8 + 1 {
            return Err(DecodeError::Truncated);
        }
        let key = body.split_to(key_len);
        let routing_key = std::str::from_utf8(&key)
            .map_err(|_| DecodeError::NotUtf8)?
            .to_string();
        let mut id = [0u8; 16];
        body.copy_to_slice(&mut id);
        let origin = Uuid::from_bytes(id);
        body.copy_to_slice(&mut id);
        let destination = Uuid::from_bytes(id);
        let connection_id = body.get_u64();
        let ttl = body.get_u8();
        Ok(Some(StreamHeader {
            routing_key,
            origin,
            destination,
            connection_id,
            ttl,
        }))
    }
}

impl ConnectResult {
    /// A successful result.
    pub fn ok() -> Self {
        ConnectResult {
            status: ConnectStatus::Ok,
            detail: String::new(),
        }
    }

    /// A failed result with a detail.
    pub fn failed(status: ConnectStatus, detail: impl Into<String>) -> Self {
        ConnectResult {
            status,
            detail: detail.into(),
        }
    }

    /// Appends the encoded result to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(match self.status {
            ConnectStatus::Ok => 0,
            ConnectStatus::Refused => 1,
            ConnectStatus::NoTarget => 2,
            ConnectStatus::Unreachable => 3,
        });
        let detail = truncate(&self.detail, MAX_DETAIL_LEN);
        out.put_u16(detail.len() as u16);
        out.put_slice(detail.as_bytes());
    }

    /// Decodes a result from the front of `buf`, consuming it; `Ok(None)` if incomplete.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, DecodeError> {
        if buf.len() < 3 {
            return Ok(None);
        }
        let status = match buf[0] {
            0 => ConnectStatus::Ok,
            1 => ConnectStatus::Refused,
            2 => ConnectStatus::NoTarget,
            3 => ConnectStatus::Unreachable,
            other => return Err(DecodeError::BadTag(other)),
        };
        let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
        if len > MAX_DETAIL_LEN {
            return Err(DecodeError::TooLong(len));
        }
        if buf.len() < 3 + len {
            return Ok(None);
        }
        buf.advance(3);
        let raw = buf.split_to(len);
        let detail = String::from_utf8_lossy(&raw).into_owned();
        Ok(Some(ConnectResult { status, detail }))
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_round_trips_in_pieces(key in "[a-z0-9.-]{1,60}", o in any::<[u8; 16]>(), d in any::<[u8; 16]>(), id in any::<u64>(), ttl in any::<u8>(), cut in 1usize..20) {
            let header = StreamHeader {
                routing_key: key,
                origin: Uuid::from_bytes(o),
                destination: Uuid::from_bytes(d),
                connection_id: id,
                ttl,
            };
            let mut wire = BytesMut::new();
            header.encode(&mut wire);
            wire.put_slice(b"payload");
            let mut buf = BytesMut::new();
            let mut decoded = None;
            for chunk in wire.chunks(cut) {
                buf.extend_from_slice(chunk);
                if decoded.is_none() {
                    decoded = StreamHeader::decode(&mut buf).unwrap();
                }
            }
            prop_assert_eq!(decoded, Some(header));
            prop_assert_eq!(&buf[..], b"payload");
        }

        #[test]
        fn garbage_never_panics(data in prop::collection::vec(any::<u8>(), 0..400)) {
            let mut buf = BytesMut::from(&data[..]);
            let _ = StreamHeader::decode(&mut buf);
            let mut buf = BytesMut::from(&data[..]);
            let _ = ConnectResult::decode(&mut buf);
        }
    }

    #[test]
    fn results_round_trip() {
        for result in [
            ConnectResult::ok(),
            ConnectResult::failed(ConnectStatus::Refused, "connection refused"),
            ConnectResult::failed(ConnectStatus::NoTarget, ""),
            ConnectResult::failed(ConnectStatus::Unreachable, "no route"),
        ] {
            let mut wire = BytesMut::new();
            result.encode(&mut wire);
            assert_eq!(ConnectResult::decode(&mut wire).unwrap(), Some(result));
            assert!(wire.is_empty());
        }
    }

    #[test]
    fn oversized_header_is_refused() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0, 0][..]);
        assert!(StreamHeader::decode(&mut buf).is_err());
    }
}
