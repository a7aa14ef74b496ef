//! A TCP proxy on loopback for what a network does to a server on this machine: a fixed one-way delay in
//! each direction (benchmarks: a database 1 ms away) and outages (every connection cut, new ones closed at
//! once, until it is restored). Threads with `std::thread::sleep` rather than tokio timers, whose
//! millisecond ticks would round a 0.5 ms delay up to 1 ms or more. Needs no privileges, unlike netem in a
//! network namespace.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A running proxy; stops accepting when dropped (open connections end when either side closes).
pub struct DelayProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    /// Both ends of every connection made, to cut them in an outage.
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl DelayProxy {
    /// Listens on a free 127.0.0.1 port and forwards each connection to `target`, delaying each direction
    /// by `one_way` (the round trip grows by twice that).
    pub fn start(target: SocketAddr, one_way: Duration) -> std::io::Result<Self> {
        Self::start_on(0, target, one_way)
    }

    /// [`DelayProxy::start`] on a given port (0: any free one), for a server that must advertise the
    /// proxy's address before the proxy can know the server's.
    pub fn start_on(port: u16, target: SocketAddr, one_way: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (flag, outage, sockets) = (stop.clone(), down.clone(), open.clone());
        thread::Builder::new()
            .name("delay-proxy".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        // In an outage a connection is closed as soon as it is made.
                        Ok((client, _)) if outage.load(Ordering::Relaxed) => drop(client),
                        Ok((client, _)) => {
                            let _ = client.set_nonblocking(false);
                            if let Ok(server) = TcpStream::connect(target) {
                                let mut open = sockets.lock().unwrap();
                                open.retain(|s| s.peer_addr().is_ok());
                                open.extend(
                                    [&client, &server].iter().filter_map(|s| s.try_clone().ok()),
                                );
                                pipe(client, server, one_way);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => return,
                    }
                }
            })?;
        Ok(Self {
            addr,
            stop,
            down,
            open,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts an outage: every open connection is cut, and new ones are closed as soon as they are made.
    pub fn cut(&self) {
        self.down.store(true, Ordering::Relaxed);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Ends an outage.
    pub fn restore(&self) {
        self.down.store(false, Ordering::Relaxed);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pipe(client: TcpStream, server: TcpStream, one_way: Duration) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    for (from, to) in [(&client, &server), (&server, &client)] {
        if let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) {
            forward(from, to, one_way);
        }
    }
}

/// One direction: a reader stamping each chunk, a writer releasing it `one_way` later.
fn forward(mut from: TcpStream, mut to: TcpStream, one_way: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + one_way, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(Shutdown::Read);
    });
    thread::spawn(move || {
        for (due, bytes) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_cuts_connections_and_closes_new_ones_until_restored() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        thread::spawn(move || {
            for s in echo.incoming() {
                let Ok(mut s) = s else { return };
                thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = DelayProxy::start(target, Duration::ZERO).unwrap();
        let ping = |c: &mut TcpStream| -> bool {
            let mut buf = [0u8; 4];
            c.write_all(b"ping").is_ok() && c.read_exact(&mut buf).is_ok()
        };
        let mut before = TcpStream::connect(proxy.addr()).unwrap();
        assert!(ping(&mut before));
        proxy.cut();
        assert!(!ping(&mut before), "an open connection is cut");
        let mut during = TcpStream::connect(proxy.addr()).unwrap();
        assert!(!ping(&mut during), "a new connection is closed");
        proxy.restore();
        let mut after = TcpStream::connect(proxy.addr()).unwrap();
        assert!(ping(&mut after));
    }

    #[test]
    fn echo_round_trips_take_twice_the_one_way_delay() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let proxy = DelayProxy::start(target, Duration::from_millis(5)).unwrap();
        let mut c = TcpStream::connect(proxy.addr()).unwrap();
        c.set_nodelay(true).unwrap();
        let mut buf = [0u8; 4];
        for _ in 0..3 {
            let t = Instant::now();
            c.write_all(b"ping").unwrap();
            c.read_exact(&mut buf).unwrap();
            let rtt = t.elapsed();
            assert_eq!(&buf, b"ping");
            assert!(rtt >= Duration::from_millis(10), "{rtt:?}");
            assert!(rtt < Duration::from_millis(200), "{rtt:?}");
        }
    }
}
