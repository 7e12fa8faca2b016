//! Which client connections are open, which of them are idle (between requests), and room for
//! one more: below `HTTP_MAX_CONNECTIONS`, or by closing an idle one.

use std::mem::MaybeUninit;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::debug;
use parking_lot::Mutex;
use socket2::SockRef;

/// One open client connection, as the guard tracks it.
pub struct Conn {
    pub id: u64,
    /// A clone of the client socket, to close it from outside (eviction, shutdown).
    pub stream: TcpStream,
    pub activity: Arc<Activity>,
    pub thread: JoinHandle<()>,
}

const IDLE: u8 = 0;
const BUSY: u8 = 1;
const CLAIMED: u8 = 2;

/// Whether a connection is between requests, answering one, or claimed to be closed for room.
/// Its thread and the acceptor change it only by compare-and-swap, so a request is either
/// started or the connection closed, never both.
pub struct Activity(AtomicU8);

impl Activity {
    /// A new connection: idle until its first request starts.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity(AtomicU8::new(IDLE)))
    }

    /// The connection thread waits for a next request. False: the connection was claimed.
    pub fn wait_between_requests(&self) -> bool {
        self.swap(BUSY, IDLE) || self.0.load(Ordering::SeqCst) == IDLE
    }

    /// The connection thread starts a request. False: the connection was claimed.
    pub fn start_request(&self) -> bool {
        self.swap(IDLE, BUSY) || self.0.load(Ordering::SeqCst) == BUSY
    }

    /// The acceptor takes an idle connection to close it; its thread will start nothing more.
    fn claim(&self) -> bool {
        self.swap(IDLE, CLAIMED)
    }

    fn is_claimed(&self) -> bool {
        self.0.load(Ordering::SeqCst) == CLAIMED
    }

    fn swap(&self, from: u8, to: u8) -> bool {
        let order = Ordering::SeqCst;
        self.0.compare_exchange(from, to, order, order).is_ok()
    }
}

impl Conn {
    /// Claims the connection to close it when it is between requests and nothing arrived that
    /// its thread has not read yet: a request that reached the socket is never cut, even
    /// before its thread has run.
    fn claim_if_idle(&self) -> bool {
        self.activity.0.load(Ordering::SeqCst) == IDLE
            && !has_unread_bytes(&self.stream)
            && self.activity.claim()
    }
}

/// A look at the socket that neither waits nor takes anything (an error counts as none).
fn has_unread_bytes(stream: &TcpStream) -> bool {
    let mut byte = [MaybeUninit::uninit(); 1];
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    matches!(SockRef::from(stream).recv_with_flags(&mut byte, flags), Ok(n) if n > 0)
}

#[derive(Default)]
pub struct Conns {
    open: Mutex<Vec<Conn>>,
}

impl Conns {
    /// Below the limit, or after closing an idle connection: true. Closed connections stay
    /// listed until their thread has ended, so every thread is joined, here or at shutdown.
    pub fn make_room(&self, max: usize) -> bool {
        let mut conns = self.open.lock();
        conns.retain(|c| !c.thread.is_finished());
        let open = conns.iter().filter(|c| !c.activity.is_claimed()).count();
        if open < max {
            return true;
        }
        let idle = conns.iter().find(|c| c.claim_if_idle());
        match idle {
            Some(conn) => {
                debug!("closing idle HTTP connection {} to make room", conn.id);
                let _ = conn.stream.shutdown(Shutdown::Both);
                true
            }
            None => false,
        }
    }

    pub fn add(&self, conn: Conn) {
        self.open.lock().push(conn);
    }

    /// Ends every connection and joins its thread. Only the reading side is shut: a response
    /// still being copied reaches its client, then the connection ends.
    pub fn close_all(&self) {
        let conns: Vec<Conn> = std::mem::take(&mut *self.open.lock());
        for conn in &conns {
            let _ = conn.stream.shutdown(Shutdown::Read);
        }
        for conn in conns {
            let _ = conn.thread.join();
        }
    }
}
