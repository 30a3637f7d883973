//! Taking `keelson.route` out of the startup parameters (`options` split the
//! way PostgreSQL's `pg_split_opts` does): never a panic, the other
//! parameters pass byte for byte, and what is left holds no route setting.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use proxy_core::route::take_route_setting;

fuzz_target!(|data: &[u8]| {
    let params = vec![
        (Bytes::from_static(b"user"), Bytes::from_static(b"u")),
        (Bytes::from_static(b"options"), Bytes::copy_from_slice(data)),
        (
            Bytes::from_static(b"application_name"),
            Bytes::copy_from_slice(data),
        ),
    ];
    if let Ok(Some((_, rest))) = take_route_setting(&params) {
        assert_eq!(rest[0], params[0]);
        assert_eq!(rest.last(), params.last());
        // Taken out once, it is gone.
        assert!(matches!(take_route_setting(&rest), Ok(None)));
    }
});
