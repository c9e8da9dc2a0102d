//! Token files (YAML) as `skiff link create` and the cluster controller read them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_control::token::AccessToken;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(token) = AccessToken::parse(&text) {
        let again = AccessToken::parse(&token.to_yaml()).expect("a parsed token re-parses");
        assert_eq!(again, token);
    }
});
