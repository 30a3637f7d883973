//! Startup-phase codec: parsing a typical StartupMessage and an SSLRequest,
//! and writing an ErrorResponse.

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use proxy_core::protocol::{
    encode_startup, parse_startup, write_error, Severity, NEGOTIATE_SSL_CODE,
};

fn startup(c: &mut Criterion) {
    let params: Vec<(Bytes, Bytes)> = [
        ("user", "app_user"),
        ("database", "orders"),
        ("application_name", "checkout-service"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("extra_float_digits", "3"),
    ]
    .iter()
    .map(|(k, v)| {
        (
            Bytes::from_static(k.as_bytes()),
            Bytes::from_static(v.as_bytes()),
        )
    })
    .collect();
    let mut msg = BytesMut::new();
    encode_startup(&mut msg, 0, &params, |_| false);
    let msg = msg.freeze();

    let mut g = c.benchmark_group("startup");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_startup_message", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&msg[..]);
            parse_startup(&mut buf).expect("valid")
        })
    });
    g.bench_function("parse_ssl_request", |b| {
        b.iter(|| {
            let mut buf = BytesMut::with_capacity(8);
            buf.put_u32(8);
            buf.put_u32(NEGOTIATE_SSL_CODE);
            parse_startup(&mut buf).expect("valid")
        })
    });
    g.bench_function("write_error_response", |b| {
        let mut buf = BytesMut::with_capacity(256);
        b.iter(|| {
            buf.clear();
            write_error(
                &mut buf,
                Severity::Fatal,
                "57P01",
                "terminating connection: the primary changed",
                None,
            );
            buf.len()
        })
    });
    g.finish();
}

criterion_group!(benches, startup);
criterion_main!(benches);
