//! Against a real broker: `PORTLEASE_SOCKET=/path/to/broker.sock cargo test`.
//!
//! Without `PORTLEASE_SOCKET` every test here prints why and passes without
//! running (start one with `portlease serve --socket /tmp/pl/s.sock --range 30000-30099`).
//! The broker's range must hold at least 40 free ports.

use std::collections::HashSet;
use std::net::TcpListener;

use portlease::{Client, Error, ErrorCode, LeaseOptions};

fn broker() -> Option<Client> {
    match std::env::var_os("PORTLEASE_SOCKET").filter(|v| !v.is_empty()) {
        None => {
            eprintln!("skipped: PORTLEASE_SOCKET is not set (these tests need a running broker)");
            None
        }
        Some(_) => Some(Client::connect().expect("the broker at $PORTLEASE_SOCKET answers")),
    }
}

fn mine(client: &Client) -> Vec<Vec<u16>> {
    let me = std::process::id();
    let mut ports: Vec<Vec<u16>> = client
        .status()
        .unwrap()
        .leases
        .into_iter()
        .filter(|l| l.pid == Some(me))
        .map(|l| l.ports)
        .collect();
    ports.sort();
    ports
}

fn consecutive(ports: &[u16], n: usize) {
    assert_eq!(ports.len(), n, "{ports:?}");
    assert!(ports.windows(2).all(|w| w[1] == w[0] + 1), "not consecutive: {ports:?}");
}

#[test]
fn lease_guard_holds_its_ports_until_dropped() {
    let Some(observer) = broker() else { return };
    let lease = portlease::lease(3).unwrap();
    consecutive(lease.ports(), 3);
    assert_eq!(lease.port(), lease.ports()[0]);
    let status = observer.status().unwrap();
    let info = status
        .leases
        .iter()
        .find(|l| l.ports == lease.ports())
        .expect("status shows the lease");
    assert_eq!(info.pid, Some(std::process::id()));
    assert_eq!(info.state, "attached");
    let note = info.note.as_deref().unwrap_or_default();
    assert!(note.contains("lease_guard_holds_its_ports_until_dropped"), "note names the test: {note:?}");
    // The ports are bindable by their holder.
    let _listeners: Vec<TcpListener> =
        lease.ports().iter().map(|p| TcpListener::bind(("127.0.0.1", *p)).unwrap()).collect();
    let ports = lease.ports().to_vec();
    drop(lease);
    let after = observer.status().unwrap();
    assert!(after.leases.iter().all(|l| l.ports != ports), "released on drop");
}

#[test]
fn one_client_holds_several_leases_and_releases_each() {
    let Some(client) = broker() else { return };
    let a = client.lease(2).unwrap();
    let b = client.lease(1).unwrap();
    let c = client.lease_with(4, &LeaseOptions { note: Some("rust itest c".into()), ttl: Some(60.0) }).unwrap();
    consecutive(a.ports(), 2);
    consecutive(c.ports(), 4);
    let all: HashSet<u16> = a.ports().iter().chain(b.ports()).chain(c.ports()).copied().collect();
    assert_eq!(all.len(), 7, "leases never overlap");
    assert_eq!(client.held().len(), 3);
    let mine_now = mine(&client);
    for lease in [&a, &b, &c] {
        assert!(mine_now.contains(&lease.ports().to_vec()), "{mine_now:?}");
    }
    let b_ports = b.ports().to_vec();
    b.release().unwrap();
    assert!(!mine(&client).contains(&b_ports));
    let c_ports = c.ports().to_vec();
    drop(c); // the drop releases on the shared connection
    assert!(!mine(&client).contains(&c_ports));
    assert_eq!(client.held(), vec![a.ports().to_vec()]);
}

#[test]
fn detach_renew_reclaim_release() {
    let Some(client) = broker() else { return };
    let lease = client.lease(2).unwrap();
    let ports = lease.ports().to_vec();
    let token = lease.token().to_owned();
    let detached = lease.detach().unwrap();
    assert_eq!(detached.ports, ports);
    assert!(detached.expires.is_some());
    let expires = client.renew(&token).unwrap();
    assert!(expires.is_some(), "a detached lease has an expiry");
    let other = Client::connect().unwrap();
    let reclaimed = other.reclaim(&token).unwrap();
    assert_eq!(reclaimed.ports(), &ports[..]);
    // Bound to `other` now: reclaiming it again from elsewhere is refused.
    let err = client.reclaim(&token).unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::InUse), "{err}");
    reclaimed.release().unwrap();
    let err = client.release(&token).unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::NotFound), "{err}");
    let free = client.lease_detached(1, &LeaseOptions { ttl: Some(5.0), ..Default::default() }).unwrap();
    assert_eq!(client.release(&free.token).unwrap(), free.ports);
}

#[test]
fn port_alloc_holds_for_the_process() {
    let Some(client) = broker() else { return };
    let first = portlease::port_alloc(4).unwrap();
    let second = portlease::port_alloc(2).unwrap();
    assert!(second + 2 <= first || first + 4 <= second, "{first} and {second} overlap");
    let held = portlease::port_alloc_client().unwrap().held();
    assert!(held.contains(&(first..first + 4).collect()), "{held:?}");
    let shown = mine(&client);
    assert!(shown.contains(&(first..first + 4).collect::<Vec<u16>>()), "{shown:?}");
    assert!(shown.contains(&(second..second + 2).collect::<Vec<u16>>()), "{shown:?}");
}

#[test]
fn refusals_carry_their_codes() {
    let Some(client) = broker() else { return };
    let err = client.lease(0).unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::BadRequest), "{err}");
    let err = client.lease(u16::MAX).unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::TooLarge), "{err}");
    assert!(err.to_string().starts_with("too-large: "), "{err}");
    let err = client.release("0123456789abcdef0123456789abcdef").unwrap_err();
    assert!(matches!(err, Error::Refused { code: ErrorCode::NotFound, .. }), "{err}");
    let err = client.renew("").unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::BadRequest), "{err}");
    // The connection stays usable after every refusal.
    client.ping().unwrap();
    assert!(client.broker_pid().is_some());
    assert!(client.metrics().unwrap().trim_end().ends_with("# EOF"));
}

#[test]
fn exhausted_says_what_would_fit() {
    let Some(client) = broker() else { return };
    let summary = client.status().unwrap().summary;
    let size = u32::from(summary.range.1 - summary.range.0) + 1;
    if size > 256 {
        eprintln!("skipped: the range ({size} ports) is larger than one request may ask for");
        return;
    }
    // A whole range's worth of ports is never free while this test holds one.
    let one = client.lease(1).unwrap();
    let err = client.lease(size as u16).unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::Exhausted), "{err}");
    assert!(err.largest().is_some_and(|n| n < u64::from(size)), "{err:?}");
    drop(one);
}

#[test]
fn no_broker_error_names_the_socket() {
    if broker().is_none() {
        return;
    }
    let path = std::env::temp_dir().join(format!("portlease-rs-none-{}/broker.sock", std::process::id()));
    let err = Client::builder().socket(&path).connect().unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert_eq!(err.path(), Some(path.as_path()));
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("portlease serve"), "{text}");
    assert!(!text.contains("os error"), "{text}");
}
