//! For tests: a server that takes connections and never answers (a stopped postmaster, a
//! frozen VM or pooler), and lets go of them when told.

use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// A server that takes connections and never answers; closing what it holds ends them.
pub struct Silent {
    pub url: String,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Silent {
    pub fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("postgres://{}/silent", listener.local_addr().unwrap());
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let holder = held.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                holder.lock().unwrap().push(stream);
            }
        });
        Silent { url, held }
    }

    /// Something that closes the connections held so far (ending their connects), from
    /// another thread.
    pub fn releaser(&self) -> impl FnOnce() + Send + 'static {
        let held = self.held.clone();
        move || held.lock().unwrap().clear()
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.held.lock().unwrap().clear();
    }
}
