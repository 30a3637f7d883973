//! Server messages during authentication: any bytes, any size limit, either
//! side, are a message, a request for more, or an error; never a panic, and
//! a message never takes more bytes than were there.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proxy_core::protocol::{parse_message, Side};

fuzz_target!(|data: &[u8]| {
    let Some((&knob, data)) = data.split_first() else {
        return;
    };
    let side = if knob & 1 == 0 {
        Side::Backend
    } else {
        Side::Client
    };
    let max = usize::from(knob) * 64;
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match parse_message(&mut buf, max, side) {
            Ok(Some(_)) => assert!(buf.len() < before),
            Ok(None) | Err(_) => break,
        }
    }
});
