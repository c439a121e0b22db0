//! Client for the [portlease] broker: leases of consecutive TCP/UDP ports that
//! end when the holder's connection closes (normal exit, panic, `kill -9`).
//!
//! ```no_run
//! // One lease, held until the guard is dropped:
//! let lease = portlease::lease(3)?;
//! let (rpc, p2p, zmq) = (lease.ports()[0], lease.ports()[1], lease.ports()[2]);
//! # let _ = (rpc, p2p, zmq);
//!
//! // A drop-in for fedimint_portalloc::port_alloc: the base of 12 consecutive
//! // ports, held until the process exits.
//! let base: u16 = portlease::port_alloc(12)?;
//! # let _ = base;
//!
//! // Several leases on one connection:
//! let client = portlease::Client::connect()?;
//! let db = client.lease(1)?;
//! let nodes = client.lease(10)?;
//! # let _ = (db, nodes);
//! # Ok::<(), portlease::Error>(())
//! ```
//!
//! The socket is chosen as the Python client chooses it: `$PORTLEASE_SOCKET`,
//! else the system socket `/run/portlease/portlease.sock` where a system
//! deployment exists (`/run/portlease` or `/etc/portlease/config.toml` is
//! present), else the per-user socket (`$XDG_RUNTIME_DIR/portlease/portlease.sock`,
//! else `/tmp/portlease-$UID/portlease.sock`), with the same safety checks.
//! This crate never starts a broker: run `portlease serve`, or install the
//! system service.
//!
//! [portlease]: https://github.com/portlease/portlease

#![warn(missing_docs)]

mod client;
mod error;
mod protocol;
mod socket;

use std::sync::{Mutex, PoisonError};

pub use client::{default_note, Builder, Client, Detached, Lease, LeaseOptions, StatusQuery};
pub use error::{Error, ErrorCode, Result};
pub use protocol::{
    LeaseInfo, Status, Summary, MAX_NOTE, MAX_STATUS_LEASES, MAX_TTL, MIN_TTL, PROTOCOL_VERSION,
};

/// Lease `count` consecutive ports on a connection of their own.
///
/// The ports are yours until the returned guard is dropped or the process
/// dies. Errors name the socket when no broker answers.
pub fn lease(count: u16) -> Result<Lease> {
    Client::connect()?.lease(count)
}

/// The process-wide connection of [`port_alloc`]: never closed, so its leases
/// last until the process exits (the kernel then closes the socket).
static PROCESS_CLIENT: Mutex<Option<Client>> = Mutex::new(None);

/// The base port of `range_size` consecutive ports, held until the process exits.
///
/// The same shape as `fedimint_portalloc::port_alloc`, so a test suite moves by
/// changing one `use` line. Unlike the crate's 120 s reservation, the ports stay
/// yours for the life of the process, and are free again the moment it exits,
/// however it exits. All calls share one connection.
pub fn port_alloc(range_size: u16) -> Result<u16> {
    let client = {
        let mut process = PROCESS_CLIENT.lock().unwrap_or_else(PoisonError::into_inner);
        match process.as_ref() {
            Some(client) => client.clone(),
            None => process.insert(Client::connect()?).clone(),
        }
    };
    let ports = client.lease(range_size)?.keep();
    Ok(ports[0])
}

/// The client [`port_alloc`] uses (None before its first call), for `status`
/// or to check that its leases survived a broker restart.
pub fn port_alloc_client() -> Option<Client> {
    PROCESS_CLIENT.lock().unwrap_or_else(PoisonError::into_inner).clone()
}
