//! `--rate-limit` over HTTP: a real server (no model needed: the routes tested answer
//! without one) spoken to over a raw TCP socket.

use brise_server::{ApiKey, ServerConfig};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One HTTP/1.1 request; the whole response as text.
fn get(addr: SocketAddr, path: &str, key: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the response");
    out
}

fn status(r: &str) -> u16 {
    r.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn header<'a>(r: &'a str, name: &str) -> Option<&'a str> {
    let head = r.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn body(r: &str) -> serde_json::Value {
    let b = r.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(b).unwrap_or_else(|e| panic!("not JSON ({e}): {r}"))
}

#[test]
fn a_tenant_over_its_rate_limit_gets_429_with_retry_after_and_others_do_not() {
    // A free port: bound, read, released.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let cfg = ServerConfig {
        addr,
        api_keys: vec![
            ApiKey {
                key: "key-acme".into(),
                tenant: "acme".into(),
            },
            ApiKey {
                key: "key-acme-2".into(),
                tenant: "acme".into(),
            },
            ApiKey {
                key: "key-beta".into(),
                tenant: "beta".into(),
            },
        ],
        max_body_bytes: 1 << 20,
        request_timeout: Duration::from_secs(10),
        shutdown_timeout: Duration::from_secs(1),
        ledger: None,
        max_connections: 64,
        header_timeout: Duration::from_secs(5),
        rate_limit: 3,
        rate_limit_tokens: 0,
        admin_key: None,
        adapter_poll: None,
        learn: None,
        train: Default::default(),
    };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(brise_server::serve(cfg, || Ok(Vec::new())));
        panic!("the server stopped: {r:?}");
    });
    let t0 = Instant::now();
    loop {
        let up = TcpStream::connect(addr).is_ok_and(|mut s| {
            let _ = write!(
                s,
                "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            let mut r = String::new();
            let _ = s.read_to_string(&mut r);
            status(&r) == 200
        });
        if up {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the server never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // 3 a minute: acme's two keys share one bucket of three.
    for key in ["key-acme", "key-acme-2", "key-acme"] {
        let r = get(addr, "/v1/models", key);
        assert_eq!(status(&r), 200, "{r}");
    }
    let r = get(addr, "/v1/models", "key-acme-2");
    assert_eq!(status(&r), 429, "{r}");
    // The next request is allowed 20 s after the bucket emptied: Retry-After in 1..=20.
    let retry: u64 = header(&r, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {r}"));
    assert!((1..=20).contains(&retry), "{r}");
    let e = &body(&r)["error"];
    assert_eq!(e["code"], "rate_limit_exceeded", "{r}");
    assert_eq!(e["type"], "requests", "{r}");
    assert!(e["message"].as_str().unwrap().contains("limit 3"), "{r}");
    assert!(e.get("param").is_some(), "OpenAI's shape has param: {r}");

    // beta is not slowed by acme, and /metrics (as beta) counts acme's refusal.
    let r = get(addr, "/metrics", "key-beta");
    assert_eq!(status(&r), 200, "{r}");
    assert!(
        r.contains("brise_rate_limited_total{tenant=\"acme\",limit=\"requests\"} 1\n"),
        "{r}"
    );
    assert!(!r.contains("tenant=\"beta\""), "{r}");
    // Bad keys are 401s, never counted against anyone.
    assert_eq!(status(&get(addr, "/v1/models", "nope")), 401);
}
