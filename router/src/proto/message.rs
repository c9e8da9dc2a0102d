//! Control-stream messages and their codec.
//!
//! Wire format of one frame: `u32` big-endian length of what follows, then a one-byte message
//! kind, then the kind's fields. Strings are a `u16` big-endian length and UTF-8 bytes; site ids
//! are 16 raw bytes; integers are big-endian. A frame longer than [`MAX_FRAME`] is refused before
//! any of it is buffered, so a hostile peer cannot make a router allocate more than that.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use uuid::Uuid;

use super::routing::{AdvertisedLink, AdvertisedService, Advertisement, MAX_ADVERTISED};

/// The largest control frame a router accepts (kind byte and fields, without the length prefix).
pub const MAX_FRAME: usize = 256 * 1024;

/// One control-stream message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// The first message each side sends: who it is.
    Hello {
        /// The sender's site id (must match its certificate).
        site_id: Uuid,
        /// The sender's site name, for people.
        site_name: String,
        /// The sender's skiff version.
        version: String,
        /// The link's routing cost as the linking site set it (the acceptor echoes it).
        cost: u32,
    },
    /// The link is refused; the text says why and what to do. The sender closes the link after it.
    Refuse {
        /// Human-readable reason.
        reason: String,
    },
    /// A heartbeat; the receiver answers with [`Message::Pong`] carrying the same sequence number.
    Ping {
        /// Sequence number chosen by the sender.
        seq: u64,
    },
    /// The answer to a [`Message::Ping`].
    Pong {
        /// The sequence number of the ping being answered.
        seq: u64,
    },
    /// The linking site asks for a fresh client certificate for a key it generated.
    RenewRequest {
        /// A PEM certificate signing request.
        csr_pem: String,
    },
    /// The accepting site's answer to a [`Message::RenewRequest`].
    RenewResponse {
        /// The new client certificate (PEM), or why it was refused.
        result: Result<String, String>,
    },
    /// A link-state advertisement, flooded to every router.
    Advertise(Advertisement),
}

/// Why a control frame could not be decoded. Every variant is the peer's fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame's declared length is larger than [`MAX_FRAME`].
    #[error("control frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLong(usize),
    /// The frame is empty (no kind byte).
    #[error("empty control frame")]
    Empty,
    /// The message kind byte is not one this version knows.
    #[error("unknown control message kind {0}")]
    UnknownKind(u8),
    /// A field runs past the end of its frame.
    #[error("control message truncated")]
    Truncated,
    /// Bytes remain after the last field.
    #[error("{0} unexpected trailing bytes in control message")]
    Trailing(usize),
    /// A string field is not valid UTF-8.
    #[error("control message has a string that is not UTF-8")]
    NotUtf8,
    /// A tag inside a field has a value outside its range.
    #[error("control message has an invalid tag {0}")]
    BadTag(u8),
    /// A list is longer than its bound.
    #[error("control message lists {0} items, more than allowed")]
    TooMany(usize),
}

const HELLO: u8 = 1;
const REFUSE: u8 = 2;
const PING: u8 = 3;
const PONG: u8 = 4;
const RENEW_REQUEST: u8 = 5;
const RENEW_RESPONSE: u8 = 6;
const ADVERTISE: u8 = 7;

impl Message {
    /// Appends this message as one frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0); // length, patched below
        match self {
            Message::Hello {
                site_id,
                site_name,
                version,
                cost,
            } => {
                out.put_u8(HELLO);
                out.put_slice(site_id.as_bytes());
                put_str(out, site_name);
                put_str(out, version);
                out.put_u32(*cost);
            }
            Message::Refuse { reason } => {
                out.put_u8(REFUSE);
                put_str(out, reason);
            }
            Message::Ping { seq } => {
                out.put_u8(PING);
                out.put_u64(*seq);
            }
            Message::Pong { seq } => {
                out.put_u8(PONG);
                out.put_u64(*seq);
            }
            Message::RenewRequest { csr_pem } => {
                out.put_u8(RENEW_REQUEST);
                put_str(out, csr_pem);
            }
            Message::RenewResponse { result } => {
                out.put_u8(RENEW_RESPONSE);
                match result {
                    Ok(cert) => {
                        out.put_u8(0);
                        put_str(out, cert);
                    }
                    Err(reason) => {
                        out.put_u8(1);
                        put_str(out, reason);
                    }
                }
            }
            Message::Advertise(adv) => {
                out.put_u8(ADVERTISE);
                out.put_slice(adv.origin.as_bytes());
                put_str(out, &adv.name);
                out.put_u64(adv.seq);
                let links = &adv.links[..adv.links.len().min(MAX_ADVERTISED)];
                out.put_u16(links.len() as u16);
                for link in links {
                    out.put_slice(link.peer.as_bytes());
                    out.put_u32(link.cost);
                }
                let services = &adv.services[..adv.services.len().min(MAX_ADVERTISED)];
                out.put_u16(services.len() as u16);
                for service in services {
                    put_str(out, &service.key);
                    out.put_u32(service.weight);
                }
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes one frame's body (kind byte and fields, without the length prefix).
    pub fn decode_body(mut body: Bytes) -> Result<Message, DecodeError> {
        if body.is_empty() {
            return Err(DecodeError::Empty);
        }
        let kind = body.get_u8();
        let message = match kind {
            HELLO => Message::Hello {
                site_id: get_uuid(&mut body)?,
                site_name: get_str(&mut body)?,
                version: get_str(&mut body)?,
                cost: get_u32(&mut body)?,
            },
            REFUSE => Message::Refuse {
                reason: get_str(&mut body)?,
            },
            PING => Message::Ping {
                seq: get_u64(&mut body)?,
            },
            PONG => Message::Pong {
                seq: get_u64(&mut body)?,
            },
            RENEW_REQUEST => Message::RenewRequest {
                csr_pem: get_str(&mut body)?,
            },
            RENEW_RESPONSE => {
                if body.is_empty() {
                    return Err(DecodeError::Truncated);
                }
                let result = match body.get_u8() {
                    0 => Ok(get_str(&mut body)?),
                    1 => Err(get_str(&mut body)?),
                    tag => return Err(DecodeError::BadTag(tag)),
                };
                Message::RenewResponse { result }
            }
            ADVERTISE => {
                let origin = get_uuid(&mut body)?;
                let name = get_str(&mut body)?;
                let seq = get_u64(&mut body)?;
                let count = get_count(&mut body)?;
                let mut links = Vec::with_capacity(count);
                for _ in 0..count {
                    links.push(AdvertisedLink {
                        peer: get_uuid(&mut body)?,
                        cost: get_u32(&mut body)?,
                    });
                }
                let count = get_count(&mut body)?;
                let mut services = Vec::with_capacity(count);
                for _ in 0..count {
                    services.push(AdvertisedService {
                        key: get_str(&mut body)?,
                        weight: get_u32(&mut body)?,
                    });
                }
                Message::Advertise(Advertisement {
                    origin,
                    name,
                    seq,
                    links,
                    services,
                })
            }
            other => return Err(DecodeError::UnknownKind(other)),
        };
        if body.has_remaining() {
            return Err(DecodeError::Trailing(body.remaining()));
        }
        Ok(message)
    }
}

/// Splits a byte stream into control messages.
///
/// Feed it whatever arrived with [`ControlCodec::decode`]; it returns complete messages and keeps
/// partial frames buffered. It refuses an oversized frame as soon as its length prefix is seen.
#[derive(Debug, Default)]
pub struct ControlCodec {
    buf: BytesMut,
}

impl ControlCodec {
    /// Appends received bytes to the codec's buffer.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Returns the next complete message, `Ok(None)` if more bytes are needed.
    pub fn decode(&mut self) -> Result<Option<Message>, DecodeError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(DecodeError::TooLong(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.advance(4);
        let body = self.buf.split_to(len).freeze();
        Message::decode_body(body).map(Some)
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    // Strings longer than u16::MAX are cut at a character boundary: no field legitimately gets
    // near that, and a cut string is better than a frame the peer cannot parse.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16(end as u16);
    out.put_slice(&s.as_bytes()[..end]);
}

fn get_str(body: &mut Bytes) -> Result<String, DecodeError> {
    if body.remaining() < 2 {
        return Err(DecodeError::Truncated);
    }
    let len = body.get_u16() as usize;
    if body.remaining() < len {
        return Err(DecodeError::Truncated);
    }
    let raw = body.split_to(len);
    String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::NotUtf8)
}

/// A list length, bounded so a hostile count cannot make the decoder reserve much memory.
fn get_count(body: &mut Bytes) -> Result<usize, DecodeError> {
    if body.remaining() < 2 {
        return Err(DecodeError::Truncated);
    }
    let count = body.get_u16() as usize;
    if count > MAX_ADVERTISED {
        return Err(DecodeError::TooMany(count));
    }
    Ok(count)
}

fn get_u32(body: &mut Bytes) -> Result<u32, DecodeError> {
    if body.remaining() < 4 {
        return Err(DecodeError::Truncated);
    }
    Ok(body.get_u32())
}

fn get_u64(body: &mut Bytes) -> Result<u64, DecodeError> {
    if body.remaining() < 8 {
        return Err(DecodeError::Truncated);
    }
    Ok(body.get_u64())
}

fn get_uuid(body: &mut Bytes) -> Result<Uuid, DecodeError> {
    if body.remaining() < 16 {
        return Err(DecodeError::Truncated);
    }
    let mut raw = [0u8; 16];
    body.copy_to_slice(&mut raw);
    Ok(Uuid::from_bytes(raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<[u8; 16]>(), ".{0,40}", ".{0,10}", any::<u32>()).prop_map(|(id, n, v, c)| {
                Message::Hello {
                    site_id: Uuid::from_bytes(id),
                    site_name: n,
                    version: v,
                    cost: c,
                }
            }),
            ".{0,80}".prop_map(|reason| Message::Refuse { reason }),
            any::<u64>().prop_map(|seq| Message::Ping { seq }),
            any::<u64>().prop_map(|seq| Message::Pong { seq }),
            ".{0,300}".prop_map(|csr_pem| Message::RenewRequest { csr_pem }),
            ".{0,300}".prop_map(|c| Message::RenewResponse { result: Ok(c) }),
            ".{0,300}".prop_map(|c| Message::RenewResponse { result: Err(c) }),
            (
                any::<u128>(),
                "[a-z]{0,10}",
                any::<u64>(),
                prop::collection::vec((any::<u128>(), any::<u32>()), 0..5),
                prop::collection::vec(("[a-z.-]{0,20}", any::<u32>()), 0..5),
            )
                .prop_map(|(o, name, seq, links, services)| {
                    Message::Advertise(Advertisement {
                        origin: Uuid::from_u128(o),
                        name,
                        seq,
                        links: links
                            .into_iter()
                            .map(|(p, cost)| AdvertisedLink {
                                peer: Uuid::from_u128(p),
                                cost,
                            })
                            .collect(),
                        services: services
                            .into_iter()
                            .map(|(key, weight)| AdvertisedService { key, weight })
                            .collect(),
                    })
                }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_in_arbitrary_pieces(msgs in prop::collection::vec(arb_message(), 1..8), cut in 1usize..64) {
            let mut wire = BytesMut::new();
            for m in &msgs {
                m.encode(&mut wire);
            }
            let mut codec = ControlCodec::default();
            let mut out = Vec::new();
            for chunk in wire.chunks(cut) {
                codec.extend(chunk);
                while let Some(m) = codec.decode().unwrap() {
                    out.push(m);
                }
            }
            prop_assert_eq!(out, msgs);
            prop_assert_eq!(codec.buffered(), 0);
        }

        #[test]
        fn garbage_never_panics(data in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut codec = ControlCodec::default();
            codec.extend(&data);
            for _ in 0..16 {
                match codec.decode() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_before_buffering_the_body() {
        let mut codec = ControlCodec::default();
        codec.extend(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert_eq!(codec.decode(), Err(DecodeError::TooLong(MAX_FRAME + 1)));
    }

    #[test]
    fn trailing_bytes_and_unknown_kinds_are_errors() {
        let mut wire = BytesMut::new();
        Message::Ping { seq: 7 }.encode(&mut wire);
        wire[3] += 1;
        wire.put_u8(0);
        let mut codec = ControlCodec::default();
        codec.extend(&wire);
        assert_eq!(codec.decode(), Err(DecodeError::Trailing(1)));
        assert_eq!(
            Message::decode_body(Bytes::from_static(&[99])),
            Err(DecodeError::UnknownKind(99))
        );
    }

    #[test]
    fn overlong_strings_are_cut_at_a_character_boundary() {
        let long = "é".repeat(40_000);
        let mut wire = BytesMut::new();
        Message::Refuse { reason: long }.encode(&mut wire);
        let mut codec = ControlCodec::default();
        codec.extend(&wire);
        let Some(Message::Refuse { reason }) = codec.decode().unwrap() else {
            panic!("expected a refuse message");
        };
        assert!(reason.len() <= u16::MAX as usize);
        assert!(reason.chars().all(|c| c == 'é'));
    }
}
