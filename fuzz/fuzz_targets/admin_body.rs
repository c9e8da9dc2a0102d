//! Admin API request bodies and token-redemption requests (JSON). (The claim framing and the
//! issuer's answer: `claim`.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_control::admin::{CreateConnector, CreateLink, CreateListener, IssueToken, Revoke};
use skiff_control::claim::ClaimRequest;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<CreateLink>(data);
    let _ = serde_json::from_slice::<IssueToken>(data);
    let _ = serde_json::from_slice::<CreateListener>(data);
    let _ = serde_json::from_slice::<CreateConnector>(data);
    let _ = serde_json::from_slice::<Revoke>(data);
    let _ = serde_json::from_slice::<ClaimRequest>(data);
});
