//! The HTTP front as an operator relies on it: token auth, request ids, media types.

use crate::support::http::request_with;
use crate::support::logs::lines_with;
use crate::support::{wait_until, TestApp};

/// An admin token of the tests (at least 32 bytes, as tenantd requires).
const TOKEN: &str = "s3cret-token-of-the-front-tests-0123456789";

#[test]
fn with_a_token_every_api_request_needs_it_and_the_probes_stay_open() {
    let app = TestApp::spawn_with(|c| c.api_token = Some(TOKEN.into()));
    let base = app.base();
    let get = |path: &str, auth: Option<&str>| {
        let mut headers = vec![];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        request_with(&base, "GET", path, &headers, None)
    };
    let missing = get("/api/tenants", None);
    missing.assert_error(401, "bearer token");
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    get("/api/tenants", Some("Bearer wrong")).assert_error(401, "bearer token");
    let longer = format!("Bearer {TOKEN}-and-more");
    get("/api/tenants", Some(&longer)).assert_error(401, "bearer token");
    get("/api/tenants", Some(TOKEN)).assert_error(401, "bearer token");
    get("/api/nothing", None).assert_error(401, "bearer token");
    assert_eq!(
        get("/api/tenants", Some(&format!("Bearer {TOKEN}"))).status,
        200
    );
    assert_eq!(get("/healthz", None).status, 200);
    assert_eq!(get("/readyz", None).status, 200);
}

#[test]
fn every_response_carries_a_request_id_that_tags_its_log_lines() {
    let app = TestApp::spawn();
    let json = ("Content-Type", "application/json");
    let given = request_with(
        &app.base(),
        "POST",
        "/api/tenants",
        &[json, ("X-Request-Id", "req-42")],
        Some(br#"{"name":"traced"}"#),
    );
    assert_eq!(given.status, 201);
    assert_eq!(given.header("x-request-id"), Some("req-42"));
    let tenant = given.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        lines_with(&["request_id=req-42", "tenant created", &tenant]).len(),
        1
    );
    assert_eq!(
        lines_with(&["request_id=req-42", "POST /api/tenants -> 201"]).len(),
        1
    );

    let fresh = app.get("/api/tenants");
    let id = fresh
        .header("x-request-id")
        .expect("a request id")
        .to_string();
    assert_eq!(id.len(), 32, "{id}");
    let odd = request_with(
        &app.base(),
        "GET",
        "/healthz",
        &[("X-Request-Id", "bad id with spaces")],
        None,
    );
    assert_ne!(odd.header("x-request-id"), Some("bad id with spaces"));
}

#[test]
fn probes_that_succeed_stay_out_of_the_log_and_failures_do_not() {
    let app = TestApp::spawn();
    wait_until(std::time::Duration::from_secs(20), "ready", || {
        app.get("/readyz").status == 200
    });
    for path in ["/healthz", "/readyz", "/metrics"] {
        let id = format!("probe{}", path.replace('/', "-"));
        let probe = request_with(&app.base(), "GET", path, &[("X-Request-Id", &id)], None);
        assert_eq!(probe.status, 200, "{path}");
        assert!(
            lines_with(&[&format!("request_id={id} ")]).is_empty(),
            "{path} logged at the default level"
        );
    }
    let refused = request_with(
        &app.base(),
        "DELETE",
        "/healthz",
        &[("X-Request-Id", "probe-refused")],
        None,
    );
    assert_eq!(refused.status, 405);
    assert_eq!(
        lines_with(&["request_id=probe-refused", "DELETE /healthz -> 405"]).len(),
        1
    );
}

#[test]
fn a_body_that_says_it_is_not_json_is_refused_with_415() {
    let app = TestApp::spawn();
    let post = |content_type: &str| {
        request_with(
            &app.base(),
            "POST",
            "/api/tenants",
            &[("Content-Type", content_type)],
            Some(br#"{"name":"x"}"#),
        )
    };
    post("text/plain").assert_error(415, "application/json");
    post("application/x-www-form-urlencoded").assert_error(415, "application/json");
    assert_eq!(post("application/json; charset=utf-8").status, 201);
    // A body that says nothing of its type is what a web page may send cross-site unasked.
    let none = request_with(
        &app.base(),
        "POST",
        "/api/tenants",
        &[],
        Some(br#"{"name":"y"}"#),
    );
    none.assert_error(415, "content-type: application/json");
    assert_eq!(app.tenant_ids().len(), 1);
}

#[test]
fn with_2000_idle_clients_of_one_address_the_guard_keeps_its_share_and_answers_the_rest() {
    use std::time::{Duration, Instant};
    let app = TestApp::spawn(); // HTTP_MAX_CONNECTIONS: 512, so 256 for one address
    let addr = app.base().trim_start_matches("http://").to_string();
    let idle: Vec<std::net::TcpStream> = (0..2000)
        .map(|_| std::net::TcpStream::connect(&addr).expect("an idle connection"))
        .collect();
    let started = Instant::now();
    assert_eq!(app.get("/healthz").status, 200);
    app.create_tenant("served despite idle connections");
    assert_eq!(app.get("/api/tenants").status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Every connection past the address's share was let in by closing an idle one of its own.
    let still_open = || {
        idle.iter()
            .filter(|s| {
                s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
                let mut byte = [0u8; 1];
                matches!(std::io::Read::read(&mut &**s, &mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
            })
            .count()
    };
    wait_until(
        Duration::from_secs(10),
        "the guard to hold at most 256",
        || still_open() <= 256,
    );
    let open = still_open();
    assert!(
        open >= 250,
        "the guard kept {open} of the address's 256 slots for idle clients"
    );
}

#[test]
fn a_silent_or_slow_client_is_disconnected_after_the_timeout() {
    use std::io::{Read, Write};
    let app = TestApp::spawn_with(|c| c.http_timeout = std::time::Duration::from_millis(300));
    let addr = app.base().trim_start_matches("http://").to_string();
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap(); // and never the end
    for stream in [&mut idle, &mut slow] {
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf).unwrap_or(0);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "the server closed it"
        );
        assert!(
            n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 4"),
            "{:?}",
            &buf[..n]
        );
    }
    assert_eq!(app.get("/healthz").status, 200, "others are still served");
}

#[test]
fn oversized_heads_and_chunked_bodies_are_refused_by_the_guard() {
    let app = TestApp::spawn();
    let big = "y".repeat(20_000);
    let reply = request_with(&app.base(), "GET", "/healthz", &[("X-Big", &big)], None);
    reply.assert_error(431, "larger than 16384");
    let chunked = request_with(
        &app.base(),
        "POST",
        "/api/tenants",
        &[("Transfer-Encoding", "chunked")],
        None,
    );
    chunked.assert_error(411, "content-length");
    assert_eq!(app.get("/healthz").status, 200);
}

#[test]
fn past_the_connection_limit_idle_ones_make_room_and_busy_ones_get_503() {
    use std::io::Write;
    use std::time::Duration;
    let app = TestApp::spawn_with(|c| {
        c.http_max_connections = 8;
        // Long enough that 8 slow heads are all read and held at once on a loaded machine.
        c.http_timeout = Duration::from_secs(4);
    });
    let addr = app.base().trim_start_matches("http://").to_string();
    let idle: Vec<_> = (0..8)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    assert_eq!(
        app.get("/healthz").status,
        200,
        "an idle connection made room"
    );
    // Slow-loris: connections that start a request head and never end it, added until they
    // hold every slot (one whose bytes have arrived is busy, even before the guard reads them).
    let mut slow = Vec::new();
    wait_until(
        Duration::from_secs(12),
        "a 503 once slow heads hold every slot",
        || {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .unwrap();
            slow.push(s);
            app.get("/healthz").status == 503
        },
    );
    app.get("/healthz")
        .assert_error(503, "too many connections");
    // The slow heads time out (408) and others are served again.
    wait_until(
        Duration::from_secs(15),
        "service after the slow heads timed out",
        || app.get("/healthz").status == 200,
    );
    drop((idle, slow));
}

#[test]
fn a_request_that_has_arrived_is_answered_not_closed_to_make_room() {
    use std::io::Write;
    let app = TestApp::spawn_with(|c| c.http_max_connections = 1);
    let send = || {
        let mut s = connect(&app);
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        s
    };
    // The second request arrives while the first holds the only slot, often before the guard
    // has read the first: the first must still be answered, and the second gets 200 or 503.
    let mut first_answered = 0;
    for round in 0..200 {
        let (mut first, mut second) = (send(), send());
        let (a, b) = (try_read_status(&mut first), try_read_status(&mut second));
        assert!(
            a.is_some(),
            "round {round}: the first request was closed unanswered"
        );
        assert!(
            matches!(b, Some(200 | 503)),
            "round {round}: the second got {b:?}"
        );
        first_answered += usize::from(a == Some(200));
    }
    assert!(first_answered > 0, "the first request was never served");
}

#[test]
fn a_kept_alive_request_is_answered_or_never_started_when_room_is_made() {
    use std::io::Write;
    use std::sync::{Arc, Barrier};
    let mut app = TestApp::spawn_with(|c| {
        c.http_max_connections = 1;
        c.rate_limit_per_sec = 0;
    });
    let addr = app.base().trim_start_matches("http://").to_string();
    let open = |addr: &str| {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.set_nodelay(true).unwrap();
        s
    };
    let get = |id: &str, close: &str| {
        format!("GET /api/room HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: {id}\r\n{close}\r\n")
    };
    let (mut kept, mut unanswered, mut others_served) = (open(&addr), Vec::new(), 0);
    for round in 0..1000 {
        // One request first, so the kept connection's thread waits between requests.
        let warm = get(&format!("warm-{round}"), "");
        if kept.write_all(warm.as_bytes()).is_err() || try_read_status(&mut kept).is_none() {
            kept = open(&addr);
            continue;
        }
        // Another client arrives as its next request does, a little later round by round.
        let start = Arc::new(Barrier::new(2));
        let (go, other_addr) = (start.clone(), addr.clone());
        let other = std::thread::spawn(move || {
            go.wait();
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_micros(round % 50 * 2) {}
            let mut s = open(&other_addr);
            s.write_all(get("other", "Connection: close\r\n").as_bytes())
                .unwrap();
            try_read_status(&mut s)
        });
        let id = format!("room-kept-{round}");
        start.wait();
        let sent = kept.write_all(get(&id, "").as_bytes()).is_ok();
        let answer = if sent {
            try_read_status(&mut kept)
        } else {
            None
        };
        let other = other.join().unwrap();
        assert!(matches!(other, Some(404 | 503)), "round {round}: {other:?}");
        others_served += usize::from(other == Some(404));
        if answer.is_none() {
            unanswered.push(id);
            kept = open(&addr);
        }
    }
    assert!(
        others_served > 0,
        "no kept connection was ever closed for room"
    );
    // Stopping joins every connection thread: a request that was started is logged by now.
    app.stop();
    let started_then_cut: Vec<_> = unanswered
        .iter()
        .filter(|id| !lines_with(&[&format!("request_id={id} "), "-> 404"]).is_empty())
        .collect();
    assert!(
        started_then_cut.is_empty(),
        "served, but their connection was closed for room: {started_then_cut:?}"
    );
}

/// The status of the next response on `stream` (None: the connection ended first).
fn try_read_status(stream: &mut std::net::TcpStream) -> Option<u16> {
    try_read_response(stream).map(|(status, _, _)| status)
}

/// Reads one response (head and Content-Length body) from a kept-alive connection.
fn read_response(stream: &mut std::net::TcpStream) -> (u16, String, String) {
    try_read_response(stream).expect("the connection ended before a whole response")
}

/// The next response's status, head and body (None: the connection ended first).
fn try_read_response(stream: &mut std::net::TcpStream) -> Option<(u16, String, String)> {
    use std::io::Read;
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => raw.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8(raw).ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).ok()?;
    let status = head.get(9..12)?.parse().ok()?;
    Some((status, head, String::from_utf8(body).ok()?))
}

fn connect(app: &TestApp) -> std::net::TcpStream {
    let addr = app.base().trim_start_matches("http://").to_string();
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    stream
}

#[test]
fn clients_trickling_their_bodies_hold_no_thread_that_others_need() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let app = TestApp::spawn_with(|c| c.http_timeout = Duration::from_secs(10));
    // More slow uploads than there are HTTP threads, each a head at once and then 2 KiB of body
    // a few bytes at a time.
    let mut slow: Vec<_> = (0..24).map(|_| connect(&app)).collect();
    for s in &mut slow {
        s.write_all(
            b"POST /api/tenants HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2048\r\n\r\n{\"name\":\"",
        )
        .unwrap();
    }
    for _ in 0..3 {
        for s in &mut slow {
            s.write_all(b"aaaa").unwrap();
        }
        let started = Instant::now();
        assert_eq!(app.get("/healthz").status, 200);
        assert_eq!(app.get("/api/tenants").status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    drop(slow);
}

#[test]
fn a_kept_alive_connection_carries_request_after_request() {
    use std::io::Write;
    let app = TestApp::spawn();
    let mut stream = connect(&app);
    for i in 0..3 {
        let body = format!(r#"{{"name":"kept alive {i}"}}"#);
        let request = format!(
            "POST /api/tenants HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let (status, _, body) = read_response(&mut stream);
        assert_eq!(status, 201, "{body}");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut stream).0, 200);
    }
    assert_eq!(app.tenant_ids().len(), 3);
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_sent() {
    use std::io::Write;
    let app = TestApp::spawn();
    let mut stream = connect(&app);
    let body = br#"{"name":"continued"}"#;
    let head = format!(
        "POST /api/tenants HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    std::io::Read::read_exact(&mut stream, &mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body).unwrap();
    let (status, _, text) = read_response(&mut stream);
    assert_eq!(status, 201, "{text}");
}

#[test]
fn the_guards_own_answers_carry_a_request_id_a_log_line_and_a_count() {
    use std::io::Write;
    use std::time::Duration;
    let app = TestApp::spawn_with(|c| c.http_timeout = Duration::from_millis(500));
    let mut stream = connect(&app);
    stream
        .write_all(b"POST /api/tenants HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: slow-body-1\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let (status, head, body) = read_response(&mut stream);
    assert_eq!(status, 408, "{head}{body}");
    assert!(head.contains("X-Request-Id: slow-body-1"), "{head}");
    assert!(body.contains("did not arrive in time"), "{body}");
    assert_eq!(
        lines_with(&["request_id=slow-body-1", "POST /api/tenants -> 408"]).len(),
        1
    );
    let chunked = request_with(
        &app.base(),
        "POST",
        "/api/tenants",
        &[
            ("Transfer-Encoding", "chunked"),
            ("X-Request-Id", "chunked-1"),
        ],
        None,
    );
    assert_eq!(chunked.status, 411);
    assert_eq!(chunked.header("x-request-id"), Some("chunked-1"));
    let mut big = connect(&app);
    big.write_all(
        b"POST /api/tenants HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: big-1\r\n\
          Content-Length: 2000000\r\n\r\n",
    )
    .unwrap();
    let (status, head, _) = read_response(&mut big);
    assert_eq!(status, 413);
    assert!(head.contains("X-Request-Id: big-1"), "{head}");
    let huge_head = request_with(
        &app.base(),
        "GET",
        "/api/tenants",
        &[("X-Big", &"y".repeat(20_000))],
        None,
    );
    assert_eq!(huge_head.status, 431);
    assert_eq!(
        huge_head.header("x-request-id").map(str::len),
        Some(32),
        "a fresh id"
    );
    assert_eq!(
        lines_with(&["request_id=big-1", "POST /api/tenants -> 413"]).len(),
        1
    );
    let metrics = app.get("/metrics").text();
    for status in ["408", "411", "413"] {
        let series =
            format!("tenantd_http_requests_total{{route=\"/api/tenants\",status=\"{status}\"}} 1");
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }
}

/// Threads of this process named `name` (unnamed threads take their creator's name).
fn threads_called(name: &str) -> usize {
    crate::support::threads_named(name)
}

#[test]
fn stopping_ends_every_thread_tenantd_started() {
    use std::time::Duration;
    // The app is started and stopped from a thread of its own, so every unnamed thread it
    // starts (tiny_http's, amiquip's) carries that thread's name.
    let name = "edge-stop-probe";
    let db = crate::support::TestDb::create();
    let config = crate::support::test_config(&db);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let app = tenantd::start(config).expect("tenantd starts");
            let base = format!("http://{}", app.http_addr());
            for _ in 0..5 {
                assert_eq!(
                    crate::support::http::request(&base, "GET", "/healthz", None).status,
                    200
                );
            }
            app.shutdown().unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
    crate::support::wait_until(Duration::from_secs(10), "every thread to end", || {
        threads_called(name) == 0
    });
}

#[test]
fn clients_that_reset_after_expect_continue_do_not_exhaust_the_body_budget() {
    use std::io::Write;
    let app = TestApp::spawn();
    let addr = app.base().trim_start_matches("http://").to_string();
    // More than the 64 MiB the guard lets all connections hold at once.
    for _ in 0..80 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(
            b"POST /api/tenants HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
              Expect: 100-continue\r\nContent-Length: 1048576\r\n\r\n",
        )
        .unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(s); // a reset
    }
    wait_until(
        std::time::Duration::from_secs(10),
        "a body accepted again",
        || {
            app.request("POST", "/api/tenants", Some(r#"{"name":"after"}"#))
                .status
                == 201
        },
    );
}

#[test]
fn a_shutdown_ends_though_a_kept_alive_client_sends_a_request_while_http_stops() {
    use std::io::Write;
    use std::time::Duration;
    let mut app = TestApp::spawn_with(|c| c.statement_timeout = Duration::ZERO);
    let tenant = app.create_tenant("slow to pause");
    // A batch blocked in the pool makes the pause below wait, as a drain does.
    let mut locker = app.pg();
    let lock = crate::support::lock_partition(&mut locker, &tenant);
    let mut amqp = crate::support::Amqp::connect();
    amqp.publish(&crate::support::queue_name(&tenant), b"{}", None);
    amqp.wait_confirms();
    let path = format!("/api/tenants/{tenant}");
    wait_until(Duration::from_secs(10), "the batch in the pool", || {
        app.get(&path).json()["counts"]["consumed"] == 1
    });
    let mut kept = connect(&app);
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut kept).0, 200);
    let base = app.base();
    let pause = std::thread::spawn(move || {
        crate::support::http::request(&base, "PATCH", &path, Some(br#"{"status":"inactive"}"#))
    });
    wait_until(Duration::from_secs(10), "the consumer cancelled", || {
        amqp.consumers(&crate::support::queue_name(&tenant)) == 0
    });
    let running = app.app.take().unwrap();
    let stopping_line = format!("shutdown of replica {}: HTTP stops", running.replica_id());
    let stopping = std::thread::spawn(move || running.shutdown());
    // The shutdown is under way (it waits for the pause); the kept-alive client asks again.
    wait_until(Duration::from_secs(5), "HTTP to stop accepting", || {
        !lines_with(&[&stopping_line]).is_empty()
    });
    let _ = kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    lock.commit().unwrap();
    // Saved; applied (200) or, the shutdown having ended its wait, not yet (202).
    assert!([200, 202].contains(&pause.join().unwrap().status));
    wait_until(Duration::from_secs(30), "the shutdown to end", || {
        stopping.is_finished()
    });
    stopping.join().unwrap().expect("a clean shutdown");
}

#[test]
fn a_start_removes_the_socket_directories_of_killed_tenantds_and_only_those() {
    use std::os::unix::net::UnixListener;
    let tmp = std::env::temp_dir();
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let dir = |what: &str| {
        let dir = tmp.join(format!("tenantd-1-{what}{unique}"));
        std::fs::create_dir(&dir).unwrap();
        dir
    };
    let killed = dir("killed");
    drop(UnixListener::bind(killed.join("http.sock")).unwrap()); // its socket file stays
    let live = dir("live");
    let _listening = UnixListener::bind(live.join("http.sock")).unwrap();
    // A live tenantd too busy to accept: its backlog full, a blocking connect would wait.
    let busy = dir("busy");
    let _backlog = full_backlog(&busy.join("http.sock"));
    let starting = dir("starting"); // created, its socket not bound yet
    let (started, start) = std::sync::mpsc::channel();
    std::thread::spawn(move || started.send(Box::new(TestApp::spawn())).is_ok());
    let _app = start
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("a start is not held up by a busy tenantd's socket");
    assert!(
        !killed.exists(),
        "a directory whose socket refuses is removed"
    );
    assert!(live.exists(), "a directory whose socket listens stays");
    assert!(
        busy.exists(),
        "a directory whose socket listens, if slowly, stays"
    );
    assert!(starting.exists(), "a directory without a socket stays");
    for dir in [&live, &busy, &starting] {
        let _ = std::fs::remove_dir_all(dir);
    }
    assert!(
        !lines_with(&[
            "removed",
            &format!("killed{unique}"),
            "left by a tenantd that is gone"
        ])
        .is_empty(),
        "the removal is logged"
    );
}

/// A listener on `path` whose backlog is full, with the connections that fill it.
fn full_backlog(path: &std::path::Path) -> Vec<socket2::Socket> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let address = SockAddr::unix(path).unwrap();
    let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    listener.bind(&address).unwrap();
    listener.listen(1).unwrap();
    let mut held = vec![listener];
    loop {
        let client = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        client.set_nonblocking(true).unwrap();
        match client.connect(&address) {
            Ok(()) => held.push(client),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return held,
            Err(e) => panic!("filling the backlog: {e}"),
        }
    }
}

/// Sends `head` (ending in a blank line, Host and all) and reads the whole response.
fn raw(app: &TestApp, head: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = connect(app);
    stream.write_all(head.as_bytes()).unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    (text[9..12].parse().unwrap(), text)
}

#[test]
fn a_web_page_can_neither_call_nor_rebind_an_open_api() {
    let app = TestApp::spawn();
    let base = app.base();
    let json = ("Content-Type", "application/json");
    // A page of another site, with fetch() or a form.
    let evil = ("Origin", "https://evil.example");
    let body = Some(&br#"{"name":"planted"}"#[..]);
    request_with(&base, "POST", "/api/tenants", &[json, evil], body)
        .assert_error(403, "https://evil.example");
    request_with(&base, "GET", "/api/tenants", &[evil], None).assert_error(403, "not allowed");
    request_with(
        &base,
        "POST",
        "/api/tenants",
        &[("Content-Type", "text/plain")],
        body,
    )
    .assert_error(415, "application/json");
    // A page that rebinds its own name to 127.0.0.1: same origin, its own Host.
    let rebound =
        "GET /api/tenants HTTP/1.1\r\nHost: evil.example:8080\r\nConnection: close\r\n\r\n";
    let (status, text) = raw(&app, rebound);
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("evil.example"), "{text}");
    assert!(app.tenant_ids().is_empty(), "nothing was created");
    // Curl and scripts name the address or localhost.
    for host in ["localhost:8080", "127.0.0.1", "[::1]:8080"] {
        let head =
            format!("GET /api/tenants HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        assert_eq!(raw(&app, &head).0, 200, "{host}");
    }
    assert_eq!(
        lines_with(&["GET /api/tenants -> 403", "denied", "Host"]).len(),
        1,
        "the refusal is logged with its reason"
    );
}

#[test]
fn pages_of_an_allowed_origin_are_answered_with_cors_and_any_host_passes_a_credential() {
    let app = TestApp::spawn_with(|c| {
        c.api_token = Some(TOKEN.into());
        c.http_allowed_origins = vec!["https://console.example".into()];
    });
    let bearer = format!("Bearer {TOKEN}");
    let console = ("Origin", "https://console.example");
    let auth = ("Authorization", bearer.as_str());
    let reply = request_with(&app.base(), "GET", "/api/tenants", &[console, auth], None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://console.example")
    );
    assert_eq!(reply.header("vary"), Some("Origin"));
    let preflight = request_with(
        &app.base(),
        "OPTIONS",
        "/api/tenants",
        &[console, ("Access-Control-Request-Method", "POST")],
        None,
    );
    assert_eq!(preflight.status, 204, "{}", preflight.text());
    assert_eq!(
        preflight.header("access-control-allow-methods"),
        Some("GET, POST")
    );
    let allowed = preflight.header("access-control-allow-headers").unwrap();
    assert!(allowed.contains("Authorization") && allowed.contains("Content-Type"));
    let other = ("Origin", "https://console.example.evil");
    request_with(&app.base(), "GET", "/api/tenants", &[other, auth], None)
        .assert_error(403, "not allowed");
    let unlisted = request_with(&app.base(), "OPTIONS", "/api/tenants", &[other], None);
    assert_eq!(unlisted.status, 403);
    assert!(unlisted.header("access-control-allow-origin").is_none());
    // With a credential the API answers to any name the operator gives it.
    let named = format!(
        "GET /api/tenants HTTP/1.1\r\nHost: tenantd.internal:8080\r\n\
         Authorization: {bearer}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw(&app, &named).0, 200);
}
