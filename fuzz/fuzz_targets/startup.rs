//! Feeds arbitrary bytes, split at arbitrary points, to the startup-phase
//! parser. It must never panic, never allocate past the 10000-byte limit,
//! and must parse the same packets however the input is split.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proxy_core::protocol::{parse_startup, MAX_STARTUP_PACKET_LENGTH};

fn run(data: &[u8], step: usize) -> Vec<String> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in data.chunks(step.max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            match parse_startup(&mut buf) {
                Ok(Some(p)) => out.push(format!("{p:?}")),
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("error {e}"));
                    return out;
                }
            }
            assert!(buf.capacity() <= 2 * MAX_STARTUP_PACKET_LENGTH + data.len());
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let (step, data) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s), rest),
        None => return,
    };
    assert_eq!(run(data, data.len().max(1)), run(data, step));
});
