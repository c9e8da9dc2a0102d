//! A link's control stream: framed [`Message`]s over one transport stream.

use bytes::{Bytes, BytesMut};

use super::transport::{RecvStream, SendStream};
use crate::proto::{ControlCodec, Message, StreamKind};

/// Why the control stream stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    #[error("{0}")]
    Stream(#[from] super::transport::StreamError),
    #[error("peer sent a bad control message: {0}")]
    Decode(#[from] crate::proto::DecodeError),
    #[error("peer closed the control stream")]
    Closed,
    #[error("peer opened a stream that is not a control stream")]
    NotControl,
}

pub(crate) struct ControlChannel<S, R> {
    send: S,
    recv: R,
    codec: ControlCodec,
    out: BytesMut,
}

impl<S: SendStream, R: RecvStream> ControlChannel<S, R> {
    /// The opening side: writes the stream-kind byte.
    pub(crate) async fn open(mut send: S, recv: R) -> Result<Self, ControlError> {
        send.send(Bytes::copy_from_slice(&[StreamKind::Control.to_byte()]))
            .await?;
        Ok(Self::new(send, recv))
    }

    /// The accepting side: checks the stream-kind byte.
    pub(crate) async fn accept(send: S, mut recv: R) -> Result<Self, ControlError> {
        let first = loop {
            match recv.recv().await? {
                Some(chunk) if chunk.is_empty() => continue,
                Some(chunk) => break chunk,
                None => return Err(ControlError::Closed),
            }
        };
        if StreamKind::from_byte(first[0]) != Some(StreamKind::Control) {
            return Err(ControlError::NotControl);
        }
        let mut channel = Self::new(send, recv);
        channel.codec.extend(&first[1..]);
        Ok(channel)
    }

    fn new(send: S, recv: R) -> Self {
        ControlChannel {
            send,
            recv,
            codec: ControlCodec::default(),
            out: BytesMut::with_capacity(256),
        }
    }

    pub(crate) async fn send(&mut self, message: &Message) -> Result<(), ControlError> {
        message.encode(&mut self.out);
        let frame = self.out.split().freeze();
        self.send.send(frame).await?;
        Ok(())
    }

    /// The next message. Cancel-safe: a partly received frame stays buffered in the codec.
    pub(crate) async fn next(&mut self) -> Result<Message, ControlError> {
        loop {
            if let Some(message) = self.codec.decode()? {
                return Ok(message);
            }
            match self.recv.recv().await? {
                Some(chunk) => self.codec.extend(&chunk),
                None => return Err(ControlError::Closed),
            }
        }
    }

    /// Aborts the control stream (the peer sees a reset).
    pub(crate) fn reset(&mut self) {
        self.send.reset();
    }
}
