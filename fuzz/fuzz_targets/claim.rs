//! Token redemption on the wire: the issuer reads a length-prefixed frame from anyone who
//! reaches its link port, the linking site reads the issuer's answer. Framing must refuse
//! oversized lengths before reading them, and neither JSON decoder may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_control::claim::{read_frame, ClaimRequest, ClaimResponse, MAX_CLAIM_BYTES};

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    if let Ok(body) = futures::executor::block_on(read_frame(&mut input)) {
        assert!(body.len() <= MAX_CLAIM_BYTES);
        let _ = serde_json::from_slice::<ClaimRequest>(&body);
        let _ = serde_json::from_slice::<ClaimResponse>(&body);
    }
    let _ = serde_json::from_slice::<ClaimResponse>(data);
});
