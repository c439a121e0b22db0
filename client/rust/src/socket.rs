//! Which socket to use, whether it is safe, and what to say when nothing answers.
//!
//! The same rule as the Python client (`client/paths.py`):
//!
//! 1. an explicit socket ([`crate::Builder::socket`]);
//! 2. `$PORTLEASE_SOCKET`;
//! 3. the system socket `/run/portlease/portlease.sock` where a system
//!    deployment exists (`/run/portlease` or `/etc/portlease/config.toml` is
//!    present; `PORTLEASE_SYSTEM_DIR` and `PORTLEASE_SYSTEM_CONFIG` move them, as
//!    test hooks);
//! 4. the per-user socket `$XDG_RUNTIME_DIR/portlease/portlease.sock`, else
//!    `/tmp/portlease-$UID/portlease.sock`.
//!
//! Before connecting to a per-user socket its directory must be the caller's own
//! (owner, not a symlink, no group or other write); after connecting, the process
//! behind a per-user socket must run as the caller, and behind the system socket
//! as root or the caller (`SO_PEERCRED`). An explicit socket is trusted as
//! configured. This crate never starts a broker.

use std::ffi::OsString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::Error;

const SYSTEM_DIR: &str = "/run/portlease";
const SYSTEM_CONFIG: &str = "/etc/portlease/config.toml";
const SOCKET_NAME: &str = "portlease.sock";
const CHECK_SYSTEM: &str = "run `systemctl status portlease.socket` to see why";

/// Why a socket was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Argument,
    Env,
    System,
    PerUser,
}

/// A socket path and why it was chosen.
#[derive(Debug, Clone)]
pub(crate) struct Choice {
    pub path: PathBuf,
    pub source: Source,
}

impl Choice {
    fn explicit(&self) -> bool {
        matches!(self.source, Source::Argument | Source::Env)
    }
}

/// A non-empty environment variable (Python's `os.environ.get(name) or default`).
fn env(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

fn system_dir() -> PathBuf {
    env("PORTLEASE_SYSTEM_DIR").map_or_else(|| PathBuf::from(SYSTEM_DIR), PathBuf::from)
}

fn system_config() -> PathBuf {
    env("PORTLEASE_SYSTEM_CONFIG").map_or_else(|| PathBuf::from(SYSTEM_CONFIG), PathBuf::from)
}

fn lexists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

pub(crate) fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

fn user_socket() -> PathBuf {
    match env("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(runtime) if runtime.is_absolute() => runtime.join("portlease").join(SOCKET_NAME),
        _ => PathBuf::from(format!("/tmp/portlease-{}", uid())).join(SOCKET_NAME),
    }
}

/// Pick the socket by the rule in the module documentation.
pub(crate) fn choose(explicit: Option<&Path>) -> Choice {
    if let Some(path) = explicit {
        return Choice { path: path.to_owned(), source: Source::Argument };
    }
    if let Some(path) = env("PORTLEASE_SOCKET") {
        return Choice { path: PathBuf::from(path), source: Source::Env };
    }
    let dir = system_dir();
    if lexists(&dir) || lexists(&system_config()) {
        return Choice { path: dir.join(SOCKET_NAME), source: Source::System };
    }
    Choice { path: user_socket(), source: Source::PerUser }
}

/// What makes `directory` unfit to hold a per-user socket (None: fine, or missing).
fn directory_problem(directory: &Path, me: u32) -> Option<String> {
    let meta = match std::fs::symlink_metadata(directory) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("it cannot be examined ({})", reason(&e))),
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = std::fs::read_link(directory).unwrap_or_default();
        return Some(format!(
            "it is a symlink (to {}), which someone else may control",
            target.display()
        ));
    }
    if !kind.is_dir() {
        return Some("it is not a directory".to_owned());
    }
    if meta.uid() != me {
        return Some(format!("it belongs to uid {}, not to you (uid {me})", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "it is writable by group or others (mode {:04o}), so someone else may have put the socket there",
            meta.mode() & 0o7777
        ));
    }
    None
}

fn check_directory(choice: &Choice) -> Result<(), Error> {
    if choice.source != Source::PerUser {
        return Ok(());
    }
    let directory = choice.path.parent().unwrap_or(Path::new("/"));
    match directory_problem(directory, uid()) {
        None => Ok(()),
        Some(problem) => Err(Error::UnsafeSocket {
            path: choice.path.clone(),
            message: format!(
                "refusing the portlease socket {}: its directory {}: {problem}. \
                 Remove {} if it is not yours, or set PORTLEASE_SOCKET",
                choice.path.display(),
                directory.display(),
                directory.display()
            ),
        }),
    }
}

/// (pid, uid) of the process behind a connected Unix socket.
fn peer_cred(stream: &UnixStream) -> io::Result<(i32, u32)> {
    // SAFETY: a zeroed ucred is valid; getsockopt writes at most `len` bytes into it.
    unsafe {
        let mut cred: libc::ucred = mem::zeroed();
        let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
        let rc = libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((cred.pid, cred.uid))
    }
}

fn check_peer(stream: &UnixStream, choice: &Choice) -> Result<(), Error> {
    if choice.explicit() {
        return Ok(());
    }
    let me = uid();
    let (pid, peer) = peer_cred(stream).map_err(|e| Error::UnsafeSocket {
        path: choice.path.clone(),
        message: format!(
            "refusing the portlease socket {}: cannot tell who listens behind it (SO_PEERCRED: {})",
            choice.path.display(),
            reason(&e)
        ),
    })?;
    let system = choice.source == Source::System;
    if peer == me || (system && peer == 0) {
        return Ok(());
    }
    let whom = if system { "root or you" } else { "you" };
    Err(Error::UnsafeSocket {
        path: choice.path.clone(),
        message: format!(
            "refusing the portlease socket {}: the process behind it (pid {pid}) runs as uid {peer}, \
             not as {whom} (uid {me}); it is not your broker. Nothing was sent to it",
            choice.path.display()
        ),
    })
}

/// An OS error's text without Rust's " (os error N)" suffix.
pub(crate) fn reason(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

fn unavailable(choice: &Choice, e: &io::Error) -> Error {
    let path = choice.path.display();
    let why = reason(e);
    let message = if e.kind() == io::ErrorKind::PermissionDenied {
        format!(
            "permission denied on the portlease socket {path}: add this user to the socket's group \
             (usually `portlease`) and log in again"
        )
    } else {
        match choice.source {
            Source::System => {
                let missing = if e.kind() == io::ErrorKind::NotFound {
                    " (the socket file is missing)"
                } else {
                    ""
                };
                format!(
                    "the system portlease broker is down: nothing answers at {path}{missing} ({why}); \
                     {CHECK_SYSTEM}. Clients never start a private broker where a system one is installed"
                )
            }
            Source::Argument => format!(
                "no portlease broker answers at {path} ({why}); start one there with \
                 `portlease serve --socket PATH`, or pass the socket of a running broker"
            ),
            Source::Env => format!(
                "no portlease broker answers at {path} ({why}); it comes from $PORTLEASE_SOCKET: \
                 start a broker there with `portlease serve --socket PATH`, or point PORTLEASE_SOCKET \
                 at a running one"
            ),
            Source::PerUser => format!(
                "no portlease broker answers at {path} ({why}); start one with `portlease serve` \
                 (the Rust client never starts one itself)"
            ),
        }
    };
    Error::Unavailable { path: choice.path.clone(), message }
}

/// One `connect`, bounded by `timeout` (a blocking AF_UNIX connect waits while the
/// listener's backlog is full; `SO_SNDTIMEO` bounds that wait, then it fails with EAGAIN).
fn connect_once(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a usable socket path (at most {} bytes)", addr.sun_path.len() - 1),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2); the fd is owned by the UnixStream at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: addr is a valid sockaddr_un of at least `len` bytes.
        let rc = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(stream);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Connect to `choice`, checked before and after.
///
/// A system broker that is down is waited for until `deadline` (socket
/// activation may be restarting it); a full backlog (EAGAIN) is retried until
/// then too. Anything else fails at once with a message naming the path.
pub(crate) fn dial(choice: &Choice, deadline: Instant) -> Result<UnixStream, Error> {
    let mut delay = Duration::from_millis(5);
    loop {
        check_directory(choice)?;
        let left = deadline.saturating_duration_since(Instant::now());
        match connect_once(&choice.path, left.max(Duration::from_secs(1))) {
            Ok(stream) => {
                check_peer(&stream, choice)?;
                return Ok(stream);
            }
            Err(e) => {
                let again = e.kind() == io::ErrorKind::WouldBlock
                    || (choice.source == Source::System && e.kind() != io::ErrorKind::PermissionDenied);
                if !again || Instant::now() + delay >= deadline {
                    return Err(unavailable(choice, &e));
                }
                thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_problems_are_named() {
        let base = std::env::temp_dir().join(format!("portlease-rs-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let me = uid();
        assert_eq!(directory_problem(&base.join("missing"), me), None);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(directory_problem(&base, me), None);
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let problem = directory_problem(&base, me).unwrap();
        assert!(problem.contains("mode 0777"), "{problem}");
        assert!(directory_problem(&base, me + 1).unwrap().contains("belongs to uid"));
        let link = base.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&base, &link).unwrap();
        assert!(directory_problem(&link, me).unwrap().contains("symlink"));
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn reasons_drop_the_os_error_number() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(reason(&e), "No such file or directory");
    }
}
