//! The message-boundary tracker must agree with a whole-message parser on
//! any byte stream, however it is chunked.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proxy_core::protocol::{parse_message, MessageTracker, Side};

fuzz_target!(|data: &[u8]| {
    let (step, data) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s).max(1), rest),
        None => return,
    };
    let mut t = MessageTracker::default();
    for chunk in data.chunks(step) {
        t.observe(chunk);
    }
    // Reference: parse whole messages; the tracker is at a boundary exactly
    // when the parser consumed everything.
    let mut buf = BytesMut::from(data);
    let mut bad = false;
    loop {
        match parse_message(&mut buf, 1 << 20, Side::Backend) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                bad = true;
                break;
            }
        }
    }
    if bad {
        return;
    }
    assert_eq!(t.to_boundary() == Some(0), buf.is_empty());
});
