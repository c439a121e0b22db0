//! The blocking client: [`Client`] (one connection, any number of leases) and the
//! [`Lease`] guard.
//!
//! A lease lives as long as its connection. When the broker itself goes away
//! (restart, upgrade, crash) it restores the leases from its journal as
//! *orphans* for one TTL; the client must reclaim them within that time even if
//! the program makes no call meanwhile (a test holding ports for minutes, or
//! [`crate::port_alloc`], which never calls again). So a client that holds
//! leases runs one watcher thread (`portlease-reclaim`) that waits in `poll(2)`
//! for the broker to hang up, then reconnects and sends `hello` and one
//! `reclaim` per held lease in one write, as the Python session does. A lease
//! the broker refuses to give back is reported on stderr and returned as
//! [`Error::LeaseLost`] from the next [`Client::lease`] and from [`Lease::check`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::protocol::{self, Body, Request, Status, MAX_CLIENT, MAX_NOTE, MAX_REPLY_LINE};
use crate::socket::{self, Choice};

const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(20);
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(100);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How to connect: socket, timeout, reclaim, the name sent in `hello`.
#[derive(Debug, Clone)]
pub struct Builder {
    socket: Option<PathBuf>,
    timeout: Duration,
    reclaim: bool,
    client: String,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            socket: None,
            timeout: DEFAULT_TIMEOUT,
            reclaim: true,
            client: format!("portlease-rust/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

impl Builder {
    /// The defaults: the socket by the usual rule, 30 s timeout, reclaim on.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Use this socket (trusted as given: no ownership checks), not the usual rule.
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Builder {
        self.socket = Some(path.into());
        self
    }

    /// Bound every request, and every wait for a system broker that is down (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Builder {
        self.timeout = timeout;
        self
    }

    /// Reconnect and reclaim held leases when the broker restarts (default on).
    pub fn reclaim(mut self, on: bool) -> Builder {
        self.reclaim = on;
        self
    }

    /// The name sent in `hello` (default `portlease-rust/VERSION`).
    pub fn client_name(mut self, name: impl Into<String>) -> Builder {
        self.client = truncate(name.into(), MAX_CLIENT);
        self
    }

    /// Connect now. The error names the socket and how to start a broker.
    pub fn connect(self) -> Result<Client> {
        let choice = socket::choose(self.socket.as_deref());
        let stream = socket::dial(&choice, Instant::now() + self.timeout)?;
        let conn = Conn::new(stream, self.timeout).map_err(|e| Error::ConnectionLost(format!(
            "cannot set up the connection to the portlease broker at {}: {}",
            choice.path.display(),
            socket::reason(&e)
        )))?;
        let shared = Shared {
            choice,
            timeout: self.timeout,
            reclaim: self.reclaim,
            name: self.client,
            state: Mutex::new(State {
                conn: Some(conn),
                next_id: 0,
                held: HashMap::new(),
                lost: VecDeque::new(),
                lost_tokens: HashSet::new(),
                broker_pid: None,
                wake: None,
            }),
        };
        Ok(Client { shared: Arc::new(shared) })
    }
}

/// Options of one lease beyond its count.
#[derive(Debug, Clone, Default)]
pub struct LeaseOptions {
    /// What `portlease status` shows next to the lease (default: [`default_note`]).
    pub note: Option<String>,
    /// Seconds an unbound lease lives (1 to 86400; default: the broker's, usually 120).
    pub ttl: Option<f64>,
}

/// A lease detached from its connection: it lives by its TTL alone, until
/// released, renewed ([`Client::renew`]) or reclaimed ([`Client::reclaim`]) by token.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Detached {
    /// Its ports.
    pub ports: Vec<u16>,
    /// The proof of ownership: keep it to yourself.
    pub token: String,
    /// When it expires (Unix seconds).
    pub expires: Option<f64>,
}

/// A query for one `status` page (see `docs/protocol.md`).
#[derive(Debug, Clone, Default)]
pub struct StatusQuery {
    /// Only this uid's leases.
    pub uid: Option<u32>,
    /// Only leases whose first port is above this one (the next page).
    pub after: Option<u16>,
    /// At most this many leases (1 to 1000).
    pub limit: Option<u32>,
}

/// One connection to the broker, on which any number of leases can be taken.
///
/// Cheap to clone (the clones share the connection) and safe to share between
/// threads; requests are serialised. The connection closes when the last
/// `Client` clone and the last [`Lease`] taken on it are dropped, and the broker
/// then releases every lease still bound to it.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("socket", &self.shared.choice.path).finish_non_exhaustive()
    }
}

/// Leased ports, held until this guard is dropped (or [`Lease::release`]d).
///
/// Dropping it releases the lease (one round trip: the ports are free for
/// others when the drop returns); when it is the last user of the connection
/// (as with [`crate::lease`]), the connection closes too.
pub struct Lease {
    client: Client,
    ports: Vec<u16>,
    token: String,
    ttl: f64,
    done: bool,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease").field("ports", &self.ports).finish_non_exhaustive()
    }
}

impl Lease {
    /// The consecutive ports.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The first port.
    pub fn port(&self) -> u16 {
        self.ports[0]
    }

    /// The token that proves ownership (whoever has it can release the lease).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The TTL the broker applies if the lease becomes unbound (seconds).
    pub fn ttl(&self) -> f64 {
        self.ttl
    }

    /// The connection the lease is bound to.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// [`Error::LeaseLost`] if the lease could not be reclaimed after a broker restart.
    pub fn check(&self) -> Result<()> {
        let st = self.client.shared.lock();
        match st.lost_tokens.contains(&self.token) {
            false => Ok(()),
            true => Err(Error::LeaseLost {
                ports: self.ports.clone(),
                message: lost_message(&self.ports, "the broker refused to give it back or stayed away"),
            }),
        }
    }

    /// Release now, and report an error the drop would swallow.
    pub fn release(mut self) -> Result<()> {
        self.done = true;
        self.client.release_held(&self.token).map(drop)
    }

    /// Unbind the lease from its connection: it then lives by its TTL alone.
    pub fn detach(mut self) -> Result<Detached> {
        self.done = true;
        let token = self.token.clone();
        match self.client.shared.call(Request::Detach { token: token.clone() })? {
            Body::Detached { ports, expires } => Ok(Detached { ports, token, expires: Some(expires) }),
            other => Err(unexpected(other)),
        }
    }

    /// Drop the guard but keep the lease: it stays bound to its connection and
    /// is released when the connection closes (the last [`Client`] and `Lease`
    /// of it dropped, or the process exits). Returns the ports.
    pub fn keep(mut self) -> Vec<u16> {
        self.done = true;
        std::mem::take(&mut self.ports)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if Arc::strong_count(&self.client.shared) == 1 && self.client.shared.lock().conn.is_none() {
            // Ours is the last handle and the broker is away: nothing to tell it
            // (no reconnect from a destructor); the orphan lapses after its TTL.
            return;
        }
        // A round trip even when the connection closes right after, so that the
        // ports are free for others by the time the drop returns (a close alone
        // is seen by the broker a moment later).
        let _ = self.client.release_held(&self.token);
    }
}

impl Client {
    /// Connect with the defaults (see [`Builder`]).
    pub fn connect() -> Result<Client> {
        Builder::new().connect()
    }

    /// A [`Builder`] for other settings.
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// The socket this client talks to.
    pub fn socket_path(&self) -> &Path {
        &self.shared.choice.path
    }

    /// Lease `count` consecutive ports, bound to this connection, with the default note.
    pub fn lease(&self, count: u16) -> Result<Lease> {
        self.lease_with(count, &LeaseOptions::default())
    }

    /// Lease `count` consecutive ports with a note or TTL of your own.
    ///
    /// A lease lost across a broker restart and not yet reported is returned
    /// first, as [`Error::LeaseLost`].
    pub fn lease_with(&self, count: u16, options: &LeaseOptions) -> Result<Lease> {
        {
            let mut st = self.shared.lock();
            if let Some((_, lost)) = st.lost.pop_front() {
                return Err(lost);
            }
        }
        let note = options.note.clone().unwrap_or_else(default_note);
        let request = Request::Lease {
            count,
            ttl: options.ttl,
            note: Some(truncate(note, MAX_NOTE)),
            detach: false,
        };
        match self.shared.call(request)? {
            Body::Granted { ports, token, ttl, .. } => {
                self.watch();
                Ok(Lease { client: self.clone(), ports, token, ttl, done: false })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Lease `count` ports detached from the start: they outlive this connection
    /// until their TTL lapses, unless renewed, reclaimed or released by token.
    pub fn lease_detached(&self, count: u16, options: &LeaseOptions) -> Result<Detached> {
        let note = options.note.clone().unwrap_or_else(default_note);
        let request = Request::Lease {
            count,
            ttl: options.ttl,
            note: Some(truncate(note, MAX_NOTE)),
            detach: true,
        };
        match self.shared.call(request)? {
            Body::Granted { ports, token, expires, .. } => Ok(Detached { ports, token, expires }),
            other => Err(unexpected(other)),
        }
    }

    /// Bind a detached or orphaned lease to this connection; `in-use` if another
    /// live connection holds it.
    pub fn reclaim(&self, token: &str) -> Result<Lease> {
        match self.shared.call(Request::Reclaim { token: token.to_owned() })? {
            Body::Reclaimed { ports } => {
                self.watch();
                Ok(Lease { client: self.clone(), ports, token: token.to_owned(), ttl: 0.0, done: false })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Push an unbound lease's expiry to now + its TTL; returns the new expiry
    /// (None for a lease bound to a live connection, which never expires).
    pub fn renew(&self, token: &str) -> Result<Option<f64>> {
        match self.shared.call(Request::Renew { token: token.to_owned() })? {
            Body::Renewed { expires, .. } => Ok(expires),
            other => Err(unexpected(other)),
        }
    }

    /// Release a lease by token (a detached one, say); returns its ports.
    pub fn release(&self, token: &str) -> Result<Vec<u16>> {
        match self.shared.call(Request::Release { token: token.to_owned() })? {
            Body::Released { ports } => Ok(ports),
            other => Err(unexpected(other)),
        }
    }

    /// Every lease the broker holds (all pages) and the summary of its range.
    pub fn status(&self) -> Result<Status> {
        let mut all = self.status_page(&StatusQuery::default())?;
        while all.more {
            let after = all.leases.last().map(|l| l.ports[0]);
            let page = self.status_page(&StatusQuery { after, ..StatusQuery::default() })?;
            all.leases.extend(page.leases);
            all.summary = page.summary;
            all.more = page.more && after.is_some();
        }
        Ok(all)
    }

    /// One `status` page.
    pub fn status_page(&self, query: &StatusQuery) -> Result<Status> {
        let request = Request::Status { uid: query.uid, after: query.after, limit: query.limit };
        match self.shared.call(request)? {
            Body::Status(status) => Ok(status),
            other => Err(unexpected(other)),
        }
    }

    /// The broker's metrics in the OpenMetrics text format.
    pub fn metrics(&self) -> Result<String> {
        match self.shared.call(Request::Metrics {})? {
            Body::Metrics { text } => Ok(text),
            other => Err(unexpected(other)),
        }
    }

    /// A round trip (reconnecting first if the broker restarted).
    pub fn ping(&self) -> Result<()> {
        match self.shared.call(Request::Ping {})? {
            Body::Pong {} => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The pid of the broker this client last said hello to.
    pub fn broker_pid(&self) -> Option<u32> {
        self.shared.lock().broker_pid
    }

    /// Ports of the leases bound to this connection now.
    pub fn held(&self) -> Vec<Vec<u16>> {
        let st = self.shared.lock();
        let mut held: Vec<Vec<u16>> = st.held.values().map(|h| h.ports.clone()).collect();
        held.sort();
        held
    }

    fn release_held(&self, token: &str) -> Result<Vec<u16>> {
        let was_held = {
            let mut st = self.shared.lock();
            if st.lost_tokens.remove(token) {
                // The broker no longer knows it: releasing only acknowledges the loss.
                st.lost.retain(|(lost, _)| lost != token);
                return Ok(Vec::new());
            }
            // Forgotten first: a reconnect meanwhile must not reclaim it.
            st.held.remove(token).is_some()
        };
        match self.shared.call(Request::Release { token: token.to_owned() }) {
            Ok(Body::Released { ports }) => Ok(ports),
            Ok(other) => Err(unexpected(other)),
            Err(Error::Refused { code: crate::ErrorCode::NotFound, .. }) if was_held => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Start the watcher thread once there is something to reclaim, or wake it.
    fn watch(&self) {
        if !self.shared.reclaim {
            return;
        }
        let mut st = self.shared.lock();
        if let Some(wake) = &st.wake {
            poke(wake.as_raw_fd());
            return;
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            eprintln!(
                "portlease: cannot start the reclaim watcher ({}); leases are reclaimed on the next call only",
                socket::reason(&io::Error::last_os_error())
            );
            return;
        }
        // SAFETY: both fds are fresh and owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let weak = Arc::downgrade(&self.shared);
        let spawned = thread::Builder::new()
            .name("portlease-reclaim".into())
            .spawn(move || watcher(weak, read));
        match spawned {
            Ok(_) => st.wake = Some(write),
            Err(e) => eprintln!("portlease: cannot start the reclaim watcher ({e})"),
        }
    }
}

// ---------------------------------------------------------------- the connection

struct Shared {
    choice: Choice,
    timeout: Duration,
    reclaim: bool,
    name: String,
    state: Mutex<State>,
}

struct Held {
    ports: Vec<u16>,
    ttl: f64,
}

struct State {
    conn: Option<Conn>,
    next_id: u64,
    /// Leases bound to the connection, by token: what a reconnect reclaims.
    held: HashMap<String, Held>,
    /// Leases lost across a restart and not yet reported by `lease`.
    lost: VecDeque<(String, Error)>,
    lost_tokens: HashSet<String>,
    broker_pid: Option<u32>,
    /// Write end of the watcher's pipe; dropping it (with the state) stops the watcher.
    wake: Option<OwnedFd>,
}

impl State {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn lose(&mut self, token: &str, why: &str) {
        if let Some(held) = self.held.remove(token) {
            let message = lost_message(&held.ports, why);
            eprintln!("portlease: ERROR: {message}; stop using these ports");
            self.lost_tokens.insert(token.to_owned());
            self.lost.push_back((token.to_owned(), Error::LeaseLost { ports: held.ports, message }));
        }
    }

    fn give_up(&mut self, why: &str) {
        let tokens: Vec<String> = self.held.keys().cloned().collect();
        for token in tokens {
            self.lose(&token, &format!("broker unreachable until the TTL lapsed: {why}"));
        }
    }

    /// How long a vanished broker is worth waiting for: the longest TTL at stake
    /// (the broker keeps orphans that long), and at least the timeout.
    fn reconnect_span(&self, timeout: Duration) -> Duration {
        let ttl = self.held.values().map(|h| h.ttl).fold(0.0, f64::max);
        timeout.max(Duration::from_secs_f64(ttl.clamp(0.0, protocol::MAX_TTL)))
    }
}

fn lost_message(ports: &[u16], why: &str) -> String {
    format!("lease of ports {ports:?} lost after a broker restart: {why}")
}

struct Conn {
    stream: Arc<UnixStream>,
    buf: Vec<u8>,
    hello_due: bool,
}

impl Conn {
    fn new(stream: UnixStream, timeout: Duration) -> io::Result<Conn> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Conn { stream: Arc::new(stream), buf: Vec::new(), hello_due: true })
    }

    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        let mut scanned = 0;
        loop {
            if let Some(at) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=scanned + at).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                scanned = 0;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(line);
            }
            scanned = self.buf.len();
            if self.buf.len() > MAX_REPLY_LINE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "the broker sent a line too long"));
            }
            let mut chunk = [0u8; 16384];
            let n = (&*self.stream).read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the broker closed the connection"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn close(self) {
        // shutdown() acts at once for every holder of the fd (the watcher's
        // poll wakes), and the broker releases the connection's leases now.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

enum Failure {
    /// The socket went away: worth a retry on a new one.
    Dropped(String),
    /// Not worth a retry (timeout, hello refused, a reply we cannot read).
    Fatal(Error),
}

enum Expect {
    Hello,
    Reclaim(String),
    Call,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(conn) = st.conn.take() {
            conn.close();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn path(&self) -> std::path::Display<'_> {
        self.choice.path.display()
    }

    /// One request, with the reconnect and retry a dropped socket deserves.
    fn call(&self, request: Request) -> Result<Body> {
        let mut st = self.lock();
        let mut retried = false;
        loop {
            let fresh = match &st.conn {
                Some(conn) => conn.hello_due,
                None => {
                    self.reconnect(&mut st)?;
                    true
                }
            };
            match self.exchange(&mut st, &request) {
                Ok(Body::Error { code, message, largest }) => {
                    return Err(Error::Refused { code, message, largest })
                }
                Ok(body) => return Ok(body),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Dropped(why)) => {
                    // A restarting broker drops what was in flight; whatever it
                    // granted on that socket died with it, so one retry is safe.
                    if retried || !(self.reclaim || fresh) {
                        return Err(Error::ConnectionLost(format!(
                            "connection to the portlease broker at {} lost: {why}",
                            self.path()
                        )));
                    }
                    retried = true;
                }
            }
        }
    }

    /// Reach the broker again, for a caller: tries until the reconnect span ends.
    fn reconnect(&self, st: &mut State) -> Result<()> {
        let deadline = Instant::now() + st.reconnect_span(self.timeout);
        let mut delay = RECONNECT_FIRST_DELAY;
        loop {
            match self.dial_once() {
                Ok(conn) => {
                    self.install(st, conn);
                    return Ok(());
                }
                Err(e @ Error::UnsafeSocket { .. }) => {
                    st.give_up(&e.to_string());
                    return Err(e);
                }
                Err(e) => {
                    if Instant::now() + delay >= deadline {
                        st.give_up(&e.to_string());
                        return Err(e);
                    }
                    thread::sleep(delay);
                    delay = (delay * 2).min(RECONNECT_MAX_DELAY);
                }
            }
        }
    }

    fn dial_once(&self) -> Result<Conn> {
        let stream = socket::dial(&self.choice, Instant::now())?;
        Conn::new(stream, self.timeout).map_err(|e| Error::ConnectionLost(socket::reason(&e)))
    }

    fn install(&self, st: &mut State, conn: Conn) {
        if let Some(old) = st.conn.replace(conn) {
            old.close();
        }
        if let Some(wake) = &st.wake {
            poke(wake.as_raw_fd());
        }
    }

    /// Send `request` (after `hello` and a `reclaim` per held lease on a new
    /// socket, all in one write) and read the replies in order. Any failure
    /// closes the socket.
    fn exchange(&self, st: &mut State, request: &Request) -> std::result::Result<Body, Failure> {
        let mut conn = st.conn.take().expect("exchange on a connected client");
        match self.exchange_on(st, &mut conn, request) {
            Ok(body) => {
                st.conn = Some(conn);
                Ok(body)
            }
            Err(failure) => {
                conn.close();
                Err(failure)
            }
        }
    }

    fn exchange_on(
        &self,
        st: &mut State,
        conn: &mut Conn,
        request: &Request,
    ) -> std::result::Result<Body, Failure> {
        let mut out = String::new();
        let mut expect = Vec::new();
        if conn.hello_due {
            conn.hello_due = false;
            let id = st.id();
            let hello = Request::Hello { version: protocol::PROTOCOL_VERSION, client: self.name.clone() };
            out.push_str(&protocol::encode(id, &hello));
            expect.push((id, Expect::Hello));
            let tokens: Vec<String> = st.held.keys().cloned().collect();
            for token in tokens {
                let id = st.id();
                out.push_str(&protocol::encode(id, &Request::Reclaim { token: token.clone() }));
                expect.push((id, Expect::Reclaim(token)));
            }
        }
        let id = st.id();
        out.push_str(&protocol::encode(id, request));
        expect.push((id, Expect::Call));
        (&*conn.stream).write_all(out.as_bytes()).map_err(|e| self.io_failure(&e))?;
        let mut answer = None;
        for (id, what) in expect {
            let reply = loop {
                let line = conn.read_line().map_err(|e| self.io_failure(&e))?;
                let reply = protocol::decode(&line)
                    .map_err(|e| Failure::Fatal(Error::Protocol(format!("{e}: {}", String::from_utf8_lossy(&line)))))?;
                // Replies come in order; a null id is a request the broker could not read.
                if reply.id == Some(id) || reply.id_null {
                    break reply;
                }
            };
            match (what, reply.body) {
                (Expect::Hello, Body::Hello { pid }) => st.broker_pid = Some(pid),
                (Expect::Hello, Body::Error { code, message, largest }) => {
                    return Err(Failure::Fatal(Error::Refused { code, message, largest }))
                }
                (Expect::Reclaim(_), Body::Reclaimed { .. }) => {}
                (Expect::Reclaim(token), Body::Error { code, message, .. }) => {
                    st.lose(&token, &format!("reclaim refused: {code}: {message}"));
                }
                (Expect::Call, body) => answer = Some(body),
                (_, body) => return Err(Failure::Fatal(unexpected(body))),
            }
        }
        let body = answer.expect("the call's reply was read");
        match (request, &body) {
            (Request::Lease { detach: false, .. }, Body::Granted { ports, token, ttl, .. }) => {
                st.held.insert(token.clone(), Held { ports: ports.clone(), ttl: *ttl });
            }
            (Request::Reclaim { token }, Body::Reclaimed { ports }) => {
                st.held.insert(token.clone(), Held { ports: ports.clone(), ttl: 0.0 });
            }
            (Request::Detach { token } | Request::Release { token }, _) => {
                st.held.remove(token);
            }
            _ => {}
        }
        Ok(body)
    }

    fn io_failure(&self, e: &io::Error) -> Failure {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure::Fatal(Error::ConnectionLost(format!(
                "the portlease broker at {} did not answer within {:?}",
                self.path(),
                self.timeout
            ))),
            _ => Failure::Dropped(socket::reason(e)),
        }
    }
}

fn unexpected(body: Body) -> Error {
    Error::Protocol(format!("{body:?}"))
}

// ---------------------------------------------------------------- the watcher

fn poke(fd: RawFd) {
    // SAFETY: a one-byte write to our own non-blocking pipe; a full pipe already wakes.
    unsafe {
        libc::write(fd, [1u8].as_ptr().cast(), 1);
    }
}

enum Woke {
    Stop,
    Poked,
    HungUp,
    Timeout,
}

/// Wait for the socket to hang up, the pipe to be poked or closed, or `timeout` (None: forever).
fn wait(sock: Option<RawFd>, wake: RawFd, timeout: Option<Duration>) -> Woke {
    let mut fds = vec![libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 }];
    if let Some(fd) = sock {
        fds.push(libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 });
    }
    let ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
    // SAFETY: fds is a valid array of pollfd of the length given.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return Woke::Timeout; // EINTR included: the caller simply looks again
    }
    if fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        return Woke::Stop;
    }
    if fds[0].revents & libc::POLLIN != 0 {
        let mut drain = [0u8; 64];
        // SAFETY: reading into a local buffer from our own non-blocking pipe.
        while unsafe { libc::read(wake, drain.as_mut_ptr().cast(), drain.len()) } > 0 {}
        return Woke::Poked;
    }
    if fds.len() > 1 && fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
        return Woke::HungUp;
    }
    Woke::Timeout
}

/// The watcher thread of one client: it holds the client only weakly, and ends
/// when the client's last handle is dropped (its pipe's write end closes).
fn watcher(weak: Weak<Shared>, wake: OwnedFd) {
    let wake_fd = wake.as_raw_fd(); // `wake` stays open until the thread ends
    let mut deadline: Option<Instant> = None;
    let mut delay = RECONNECT_FIRST_DELAY;
    loop {
        let (sock, holding) = {
            let Some(shared) = weak.upgrade() else { return };
            let st = shared.lock();
            (st.conn.as_ref().map(|c| Arc::clone(&c.stream)), !st.held.is_empty())
        };
        if !holding {
            deadline = None;
            if let Woke::Stop = wait(None, wake_fd, None) {
                return;
            }
            continue;
        }
        if let Some(sock) = sock {
            deadline = None;
            delay = RECONNECT_FIRST_DELAY;
            match wait(Some(sock.as_raw_fd()), wake_fd, None) {
                Woke::Stop => return,
                Woke::HungUp => {
                    let Some(shared) = weak.upgrade() else { return };
                    let mut st = shared.lock();
                    if st.conn.as_ref().is_some_and(|c| Arc::ptr_eq(&c.stream, &sock)) {
                        if let Some(conn) = st.conn.take() {
                            conn.close();
                        }
                    }
                }
                Woke::Poked | Woke::Timeout => {}
            }
            continue;
        }
        // Holding leases and not connected: one reclaim attempt, never sleeping with the lock.
        let Some(shared) = weak.upgrade() else { return };
        let mut st = shared.lock();
        if st.conn.is_some() || st.held.is_empty() {
            continue;
        }
        let until = *deadline.get_or_insert_with(|| Instant::now() + st.reconnect_span(shared.timeout));
        let outcome = match shared.dial_once() {
            Ok(conn) => {
                shared.install(&mut st, conn);
                // Say hello: the same write carries a reclaim for every lease.
                match shared.exchange(&mut st, &Request::Ping {}) {
                    Ok(_) => Ok(()),
                    Err(Failure::Fatal(e)) => Err(e.to_string()),
                    Err(Failure::Dropped(why)) => Err(why),
                }
            }
            Err(e @ Error::UnsafeSocket { .. }) => {
                st.give_up(&e.to_string());
                continue;
            }
            Err(e) => Err(e.to_string()),
        };
        let Err(why) = outcome else {
            continue;
        };
        let now = Instant::now();
        if now >= until {
            st.give_up(&why);
            continue;
        }
        let pause = delay.min(until - now);
        delay = (delay * 2).min(RECONNECT_MAX_DELAY);
        drop(st);
        drop(shared);
        if let Woke::Stop = wait(None, wake_fd, Some(pause)) {
            return;
        }
    }
}

// ---------------------------------------------------------------- notes

/// The note a lease carries unless you give one: the executable's name and the
/// thread's (`cargo test` names each test's thread after the test), then the CI
/// runner and job when GitHub Actions sets them (`RUNNER_NAME`, `GITHUB_JOB`).
///
/// For example `regtest-5f1c0a3e9b2d7c41 tests::pays_invoice runner_name=ci-3 github_job=itest`.
pub fn default_note() -> String {
    let mut note = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_name().map(|name| name.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "rust".to_owned());
    if let Some(name) = thread::current().name() {
        if name != "main" {
            note.push(' ');
            note.push_str(name);
        }
    }
    for var in ["RUNNER_NAME", "GITHUB_JOB"] {
        if let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            note.push_str(&format!(" {}={}", var.to_lowercase(), value.to_string_lossy()));
        }
    }
    truncate(note, MAX_NOTE)
}

fn truncate(mut text: String, chars: usize) -> String {
    if let Some((at, _)) = text.char_indices().nth(chars) {
        text.truncate(at);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_name_the_binary_and_the_thread() {
        let note = default_note();
        let exe = std::env::current_exe().unwrap();
        assert!(note.starts_with(exe.file_name().unwrap().to_str().unwrap()), "{note}");
        assert!(note.contains("notes_name_the_binary_and_the_thread"), "{note}");
    }

    #[test]
    fn truncate_counts_characters() {
        assert_eq!(truncate("ééé".into(), 2), "éé");
        assert_eq!(truncate("ab".into(), 5), "ab");
    }
}
