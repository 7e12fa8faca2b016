//! Which client connections are open, which of them are idle (between requests), and room for
//! one more: below `HTTP_MAX_CONNECTIONS`, or by closing an idle one.

use std::mem::MaybeUninit;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// True between requests: the connection may be closed without cutting a request.
    pub idle: Arc<AtomicBool>,
    /// Closed to make room; its thread is ending.
    pub closing: AtomicBool,
    pub thread: JoinHandle<()>,
}

impl Conn {
    /// Between requests, not closing already, and nothing arrived that its thread has not read
    /// yet: a request that reached the socket is never cut, even before its thread has run.
    fn may_be_closed(&self) -> bool {
        self.idle.load(Ordering::SeqCst)
            && !self.closing.load(Ordering::SeqCst)
            && !has_unread_bytes(&self.stream)
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
        let open = conns
            .iter()
            .filter(|c| !c.closing.load(Ordering::SeqCst))
            .count();
        if open < max {
            return true;
        }
        let idle = conns.iter().find(|c| c.may_be_closed());
        match idle {
            Some(conn) => {
                debug!("closing idle HTTP connection {} to make room", conn.id);
                conn.closing.store(true, Ordering::SeqCst);
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
