//! One client must not starve the others: clients that never read their responses hold no
//! request thread; one address trickling bodies or holding slow heads leaves the rest of each
//! budget to other addresses; a credential past its rate gets 429 while others are served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;
use socket2::{Domain, Socket, Type};

use crate::support::http::Reply;
use crate::support::logs::lines_with;
use crate::support::tokens::{self, call, SECRET};
use crate::support::{queue_name, wait_until, Amqp, TestApp};

/// A connection to the app from `source` (any address of 127.0.0.0/8 is this host's).
fn connect_from(source: &str, app: &TestApp, receive_buffer: Option<usize>) -> TcpStream {
    let target: SocketAddr = app.base().trim_start_matches("http://").parse().unwrap();
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    if let Some(bytes) = receive_buffer {
        socket.set_recv_buffer_size(bytes).unwrap();
    }
    let local: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&target.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// The value of an unlabelled or labelled series in a scrape (the app is open: full view).
fn gauge(app: &TestApp, series: &str) -> f64 {
    app.get("/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// `GET /healthz` answers 200 within `bound`, five times over a few moments.
fn healthz_answers_within(app: &TestApp, bound: Duration) {
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(app.get("/healthz").status, 200);
        let took = started.elapsed();
        assert!(took < bound, "GET /healthz took {took:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn twenty_clients_that_never_read_their_pages_hold_no_thread_healthz_needs() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("big pages");
    let mut amqp = Amqp::connect();
    let pad = "x".repeat(100_000);
    for n in 0..100 {
        let body = json!({ "n": n, "pad": pad }).to_string();
        amqp.publish(&queue_name(&tenant), body.as_bytes(), None);
    }
    amqp.wait_confirms();
    app.wait_rows(&tenant, 100);
    // Pages as large as they come: 100 messages of 100 KB asked for, cut at 4 MiB. More
    // clients than request threads ask for one each and read none of it (a small receive
    // window: the kernel holds little of it either).
    let path = format!("/api/tenants/{tenant}/messages");
    let request = format!("GET {path}?limit=100 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let readers: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = connect_from("127.0.0.1", &app, Some(4096));
            s.write_all(request.as_bytes()).unwrap();
            s
        })
        .collect();
    wait_until(Duration::from_secs(30), "20 pages answered", || {
        lines_with(&[&format!("GET {path} -> ")]).len() >= 20
    });
    healthz_answers_within(&app, Duration::from_secs(1));
    let held = gauge(&app, "tenantd_http_held_bytes{kind=\"responses\"}");
    assert!(held > 20e6, "the guard holds the pages: {held} bytes");
    assert!(held <= 64.0 * 1048576.0, "within its budget: {held} bytes");
    drop(readers);
    wait_until(Duration::from_secs(10), "the pages let go", || {
        gauge(&app, "tenantd_http_held_bytes{kind=\"responses\"}") < 1e6
    });
}

#[test]
fn sixty_four_bodies_trickling_from_one_address_leave_room_for_a_publish_from_another() {
    let app = TestApp::spawn_with(|c| c.http_timeout = Duration::from_secs(60));
    let tenant = app.create_tenant("published to");
    let path = format!("/api/tenants/{tenant}/messages");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: 1048576\r\n\r\n{{\"pad\":\""
    );
    let trickling: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = connect_from("127.0.0.2", &app, None);
            s.write_all(head.as_bytes()).unwrap();
            s
        })
        .collect();
    // Those admitted hold their MiB each: half of the 64 MiB of bodies at most.
    wait_until(Duration::from_secs(30), "127.0.0.2's bodies held", || {
        for s in &trickling {
            let _ = (&*s).write_all(b"aaaa");
        }
        gauge(&app, "tenantd_http_held_bytes{kind=\"request_bodies\"}") >= 31.0 * 1048576.0
    });
    let started = Instant::now();
    let published = app.request("POST", &path, Some(r#"{"order": 42}"#));
    let took = started.elapsed();
    assert_eq!(published.status, 202, "{}", published.text());
    assert!(took < Duration::from_secs(2), "the publish took {took:?}");
    // The rest of 127.0.0.2's bodies were refused, naming why.
    let refused = trickling
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut head = [0u8; 512];
            let n = (&**s).read(&mut head).unwrap_or(0);
            String::from_utf8_lossy(&head[..n]).contains("too many request bodies in flight")
        })
        .count();
    assert!((30..=34).contains(&refused), "{refused} of 64 refused");
}

#[test]
fn slow_heads_from_one_address_leave_connections_for_another() {
    let app = TestApp::spawn_with(|c| {
        c.http_max_connections = 16;
        c.http_timeout = Duration::from_secs(60);
    });
    let slow: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = connect_from("127.0.0.2", &app, None);
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .unwrap();
            s
        })
        .collect();
    // Half of the slots are 127.0.0.2's at most: the others were answered 503 at once.
    let mut refused = vec![false; slow.len()];
    wait_until(Duration::from_secs(20), "8 of 16 refused", || {
        for (s, refused) in slow.iter().zip(&mut refused) {
            if !*refused {
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut head = [0u8; 512];
                let n = (&*s).read(&mut head).unwrap_or(0);
                let text = String::from_utf8_lossy(&head[..n]);
                *refused = text.contains("too many connections from this address");
            }
        }
        refused.iter().filter(|r| **r).count() >= 8
    });
    assert_eq!(refused.iter().filter(|r| **r).count(), 8);
    for _ in 0..8 {
        let mut other = connect_from("127.0.0.1", &app, None);
        other
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let mut head = [0u8; 12];
        other.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "127.0.0.1 is served");
    }
}

/// tenantd verifying HS256 tokens, with an admin token, allowing 1 request a second after a
/// burst of 5.
fn spawn_rate_limited() -> TestApp {
    TestApp::spawn_with(|c| {
        c.api_token = Some(crate::auth::API_TOKEN.into());
        c.jwt_hs256_secret = Some(SECRET.into());
        c.rate_limit_per_sec = 1;
        c.rate_limit_burst = 5;
    })
}

/// Sends `send` until it is answered 429 (at most 50 times); the 429.
fn until_limited(mut send: impl FnMut() -> Reply) -> Reply {
    for _ in 0..50 {
        let reply = send();
        if reply.status == 429 {
            return reply;
        }
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    panic!("50 requests and never a 429");
}

#[test]
fn a_credential_past_its_rate_gets_429_while_another_is_served() {
    let app = spawn_rate_limited();
    let base = app.base();
    let admin = crate::auth::API_TOKEN;
    let (a, b) = (
        crate::auth::create_tenant(&base, admin, "a"),
        crate::auth::create_tenant(&base, admin, "b"),
    );
    let token = |tenant: &str| tokens::hs256(SECRET.as_bytes(), &tokens::tenant(tenant));
    let (token_a, token_b) = (token(&a), token(&b));
    let path_a = format!("/api/tenants/{a}");
    let limited = until_limited(|| call(&base, Some(&token_a), "GET", &path_a, None));
    limited.assert_error(429, "too many requests");
    let wait: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "Retry-After: {wait}");
    // Tenant b, the admin and liveness are served meanwhile; a is still refused.
    let path_b = format!("/api/tenants/{b}");
    assert_eq!(
        call(&base, Some(&token_b), "GET", &path_b, None).status,
        200
    );
    assert_eq!(
        call(&base, Some(admin), "GET", "/api/tenants", None).status,
        200
    );
    assert_eq!(app.get("/healthz").status, 200);
    assert_eq!(
        call(&base, Some(&token_a), "GET", &path_a, None).status,
        429
    );
    assert!(!lines_with(&["-> 429", &format!("rate limited: tenant {a}'s token")]).is_empty());
    // Once its rate has refilled a token, a is served again.
    wait_until(Duration::from_secs(5), "a served again", || {
        call(&base, Some(&token_a), "GET", &path_a, None).status == 200
    });
}

#[test]
fn an_open_api_limits_each_client_address() {
    let app = TestApp::spawn_with(|c| {
        c.rate_limit_per_sec = 1;
        c.rate_limit_burst = 5;
    });
    let get_from = |source: &str, path: &str| {
        let mut s = connect_from(source, &app, None);
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).unwrap();
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        raw[9..12].parse::<u16>().unwrap()
    };
    let mut statuses = Vec::new();
    while !statuses.contains(&429) && statuses.len() < 50 {
        statuses.push(get_from("127.0.0.2", "/api/tenants"));
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(
        get_from("127.0.0.1", "/api/tenants"),
        200,
        "another address is served"
    );
    assert_eq!(
        get_from("127.0.0.2", "/healthz"),
        200,
        "liveness is never limited"
    );
}
