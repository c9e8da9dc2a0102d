//! Certificates and CSRs from peers: identity extraction and CSR signing.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use skiff_certs::Authority;

fn authority() -> &'static Authority {
    static CA: OnceLock<Authority> = OnceLock::new();
    CA.get_or_init(|| Authority::generate(uuid::Uuid::nil(), "fuzz").expect("CA"))
}

fuzz_target!(|data: &[u8]| {
    let _ = skiff_certs::identity_of(data);
    let text = String::from_utf8_lossy(data);
    let _ = skiff_certs::identity_of_pem(&text);
    let _ = skiff_certs::not_after_pem(&text);
    let _ = authority().sign_client_csr(&text, uuid::Uuid::nil(), "x", Duration::from_secs(60));
});
