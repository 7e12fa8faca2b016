//! A TCP proxy on 127.0.0.1 that a test can cut (every connection dropped, new ones refused),
//! freeze (bytes held, sockets kept: a peer that stops answering) and restore: a broker or
//! database outage without touching the shared servers.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

pub struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(Vec::new()));
        let upstream = upstream.to_string();
        let (c, f, s, l) = (cut.clone(), frozen.clone(), stop.clone(), live.clone());
        let acceptor =
            std::thread::spawn(move || accept_loop(&listener, &upstream, (&c, &f), &s, &l));
        Proxy {
            addr,
            cut,
            frozen,
            stop,
            live,
            acceptor: Some(acceptor),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Holds every byte from now on, keeping the connections open, until `cut`.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Drops every open connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.frozen.store(false, Ordering::SeqCst);
        for stream in self.live.lock().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    upstream: &str,
    (cut, frozen): (&Arc<AtomicBool>, &Arc<AtomicBool>),
    stop: &AtomicBool,
    live: &Mutex<Vec<TcpStream>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        if cut.load(Ordering::SeqCst) {
            continue; // dropped: the client sees its connection closed
        }
        let _ = client.set_nonblocking(false);
        let Ok(server) = TcpStream::connect(upstream) else {
            continue;
        };
        let _ = server.set_nodelay(true);
        let _ = client.set_nodelay(true);
        let mut streams = live.lock();
        for stream in [&client, &server] {
            streams.push(stream.try_clone().unwrap());
        }
        pipe(
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
            frozen,
        );
        pipe(server, client, frozen);
    }
}

/// Copies one direction until either side closes, holding bytes while frozen. These threads
/// end with their sockets.
fn pipe(mut from: TcpStream, mut to: TcpStream, frozen: &Arc<AtomicBool>) {
    let frozen = frozen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    while frozen.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5)); // a stand-in for a dead peer
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
