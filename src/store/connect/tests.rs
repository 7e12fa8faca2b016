//! Connects against servers that refuse, never answer, answer late, or hide behind others in
//! the URL.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use super::silent::Silent;
use super::*;

fn settings(url: &str) -> DbSettings {
    DbSettings {
        url: url.into(),
        connect_timeout: Duration::from_millis(300),
        statement_timeout: Duration::ZERO,
        keepalive: Duration::from_secs(10),
    }
}

#[test]
fn a_server_that_takes_the_connection_and_never_answers_fails_the_connect_in_time() {
    let silent = Silent::start();
    let settings = settings(&silent.url);
    // On a thread of the test's own: a connect that never returns fails the test, not CI.
    let (tx, rx) = bounded(1);
    std::thread::spawn(move || {
        let started = Instant::now();
        let result = connect(&settings, "test").map(|_| ());
        let _ = tx.send((result, started.elapsed()));
    });
    let (result, took) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the connect is still waiting for the silent server");
    let error = format!("{:#}", result.expect_err("nothing answered"));
    assert!(error.contains("no answer within 600ms"), "{error}");
    assert!(took >= Duration::from_millis(600), "{took:?}");
}

#[test]
fn a_server_that_refuses_fails_the_connect_with_its_error() {
    // Nothing listens on port 1 (a port freed by the test could be bound again by another).
    let url = "postgres://127.0.0.1:1/gone";
    let error = format!("{:#}", connect(&settings(url), "test").err().unwrap());
    assert!(
        error.starts_with("cannot connect to PostgreSQL at 127.0.0.1:"),
        "{error}"
    );
    assert!(!error.contains("no answer"), "{error}");
}

/// A connect that gave up on a silent server means the server cannot be reached, as a
/// refused one does: the API answers 503, not 500 with a "bug" logged.
#[test]
fn a_connect_that_gives_up_means_the_database_is_unreachable() {
    use crate::store::Failure;
    let silent = Silent::start();
    let error = connect(&settings(&silent.url), "test").err().unwrap();
    assert_eq!(Failure::of(&error), Failure::Unreachable, "{error:#}");
}

const PANICS_CHILD: &str = "TENANTD_TEST_CONNECT_PANICS_CHILD";

/// A connect whose thread panics (the postgres crate unwraps its runtime's build, which
/// fails once the process is out of file descriptors) is no longer under way: after
/// MAX_UNDER_WAY of them, and the descriptors back, a connect must still be tried.
/// Runs in a child process (its own counter, `ulimit -n 64`).
#[test]
fn a_connect_that_panics_is_no_longer_under_way() {
    if std::env::var_os(PANICS_CHILD).is_some() {
        return panicking_connects();
    }
    let name = "store::connect::tests::a_connect_that_panics_is_no_longer_under_way";
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 64 && exec "$0" --exact "$1" --nocapture --test-threads=1"#)
        .arg(std::env::current_exe().unwrap())
        .arg(name)
        .env(PANICS_CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let id = child.id();
    let (tx, rx) = bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(output) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = std::process::Command::new("kill")
            .arg("-9")
            .arg(id.to_string())
            .status();
        panic!("the child test is still running after 60 s");
    };
    let output = output.unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    assert!(said.contains("1 passed"), "the child ran no test: {said}");
}

fn panicking_connects() {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() != Some("db-connect") {
            hook(info);
        }
    }));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("postgres://{}/gone", listener.local_addr().unwrap());
    drop(listener);
    let settings = settings(&url);
    let mut files = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        files.push(f);
    }
    let first = format!("{:#}", connect(&settings, "test").err().unwrap());
    let after_one = UNDER_WAY.load(Ordering::SeqCst);
    for _ in 0..MAX_UNDER_WAY {
        let _ = connect(&settings, "test");
    }
    drop(files);
    let error = format!("{:#}", connect(&settings, "test").err().unwrap());
    assert!(
        !error.contains("still waiting for an answer"),
        "out of descriptors: {first}; under way after one panicked connect: {after_one}; \
         with the descriptors back: {error}"
    );
}

/// A server that answers only after the caller gave up: the connection it then opens is
/// closed (the server sees the session end), not kept by the abandoned thread.
/// Needs PostgreSQL at 127.0.0.1:5432 (trust).
#[test]
fn a_connect_answered_after_its_caller_gave_up_is_closed() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "postgres://postgres@{}/postgres",
        listener.local_addr().unwrap()
    );
    let (release, released) = bounded::<()>(1);
    let (ended_tx, ended) = bounded::<()>(1);
    std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        if released.recv_timeout(Duration::from_secs(30)).is_err() {
            return;
        }
        let upstream = TcpStream::connect("127.0.0.1:5432").unwrap();
        let (mut c_in, mut u_out) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut c_in, &mut u_out);
            let _ = u_out.shutdown(std::net::Shutdown::Write);
        });
        let (mut u_in, mut c_out) = (upstream, client);
        let mut buf = [0u8; 8192];
        loop {
            match u_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if c_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ended_tx.send(());
    });
    let error = format!("{:#}", connect(&settings(&url), "test late").err().unwrap());
    assert!(error.contains("no answer"), "{error}");
    release.send(()).unwrap();
    ended
        .recv_timeout(Duration::from_secs(10))
        .expect("the server still holds the session the abandoned connect opened");
}

/// A URL naming several hosts (libpq's failover list): the postgres crate gives each
/// address its own connect timeout, so two hosts that drop SYNs take 2 x 300 ms before the
/// third, a working PostgreSQL, is tried. The whole-connect deadline must not cut that off.
/// Needs PostgreSQL at 127.0.0.1:5432 (trust).
#[test]
fn a_url_of_three_hosts_reaches_the_third() {
    reaches_the_third(|a, b| {
        format!("postgres://postgres@127.0.0.1:{a},127.0.0.1:{b},127.0.0.1:5432/postgres")
    });
}

/// The same three addresses named by `hostaddr` (IP addresses, no host names): the deadline
/// counts them as it counts hosts.
#[test]
fn a_url_of_three_hostaddrs_reaches_the_third() {
    reaches_the_third(|a, b| {
        format!("postgres://postgres@/postgres?hostaddr=127.0.0.1,127.0.0.1,127.0.0.1&port={a},{b},5432")
    });
}

/// Connects to the URL `url_of` makes of two ports whose connects time out, the real
/// PostgreSQL third.
fn reaches_the_third(url_of: impl Fn(u16, u16) -> String) {
    let (_a, _fa, a) = blackhole();
    let (_b, _fb, b) = blackhole();
    let started = Instant::now();
    let result = connect(&settings(&url_of(a, b)), "test third");
    let took = started.elapsed();
    assert!(
        result.is_ok(),
        "after {took:?}: {:#}",
        result.err().unwrap()
    );
}

/// A local address whose accept queue is full: further SYNs are dropped, so connects to it
/// time out (its socket and the connection filling it are kept with it).
fn blackhole() -> (socket2::Socket, std::net::TcpStream, u16) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (socket, filler, addr.port())
}

#[test]
fn the_server_is_named_as_the_url_names_it() {
    let named = |url: &str| describe(&postgres::Config::from_str(url).unwrap());
    assert_eq!(named("postgres://u:secret@127.0.0.1:1/x"), "127.0.0.1:1/x");
    assert_eq!(named("postgres://[::1]:5433/x"), "[::1]:5433/x");
    assert_eq!(named("postgres://a,b:7/x"), "a:5432,b:7/x");
    assert_eq!(
        named("postgres:///x?hostaddr=127.0.0.1,10.0.0.2&port=1,2"),
        "127.0.0.1:1,10.0.0.2:2/x"
    );
}
