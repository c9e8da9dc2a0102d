//! Control-stream frames (hello, ping, renewal, advertisements), fed in arbitrary pieces: the
//! codec must return messages or errors, never panic, and never buffer past its bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_router::proto::{ConnPreface, ControlCodec, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    if let Some((&cut, rest)) = data.split_first() {
        let cut = usize::from(cut).max(1);
        let mut codec = ControlCodec::default();
        for chunk in rest.chunks(cut) {
            codec.extend(chunk);
            loop {
                match codec.decode() {
                    Ok(Some(message)) => {
                        // Whatever decodes must encode and decode to itself.
                        let mut wire = bytes::BytesMut::new();
                        message.encode(&mut wire);
                        let mut again = ControlCodec::default();
                        again.extend(&wire);
                        assert_eq!(again.decode().ok().flatten(), Some(message));
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            assert!(codec.buffered() <= MAX_FRAME + 4 + cut);
        }
    }
    if let Ok(raw) = <&[u8; 22]>::try_from(data.get(..22).unwrap_or_default()) {
        let _ = ConnPreface::decode(raw);
    }
});
