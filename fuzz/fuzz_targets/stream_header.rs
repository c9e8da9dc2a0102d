//! A carried connection's stream header and the destination's connect result.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use skiff_router::proto::stream::{ConnectResult, StreamHeader};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(header)) = StreamHeader::decode(&mut buf) {
        let mut wire = BytesMut::new();
        header.encode(&mut wire);
        assert_eq!(StreamHeader::decode(&mut wire).ok().flatten(), Some(header));
    }
    let mut buf = BytesMut::from(data);
    let _ = ConnectResult::decode(&mut buf);
});
