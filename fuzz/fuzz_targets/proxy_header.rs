//! PROXY protocol v2 headers from the wire: any bytes are refused or give an
//! address, never a panic; a header that parses survives a rebuild.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_core::proxy_protocol::{encode_v2, parse_v2, SIGNATURE};

fuzz_target!(|data: &[u8]| {
    // Raw bytes, and the same bytes behind a valid signature and version so
    // that the address parsing is reached.
    let _ = parse_v2(data);
    let mut h = SIGNATURE.to_vec();
    h.extend_from_slice(data);
    if h.len() > 12 {
        h[12] = 0x21;
    }
    if let Ok(Some(addr)) = parse_v2(&h) {
        let again = encode_v2(addr, addr);
        assert_eq!(parse_v2(&again).ok().flatten(), Some(addr));
    }
});
