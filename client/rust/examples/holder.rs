//! Hold leases and bind their ports; used by the project's process tests
//! (tests/process/test_rust_client.py), and a small demo.
//!
//! `holder LEASES SIZE`: takes LEASES leases of SIZE ports (every other one
//! through `port_alloc`, the rest on a `Client`), binds a TCP listener on
//! 127.0.0.1 on every port, prints one JSON line `{"pid":…,"leases":[[…],…]}`,
//! then answers each line on stdin: `check` prints `ok` once every lease is
//! still held (else the error); end of input exits.
//! Errors go to stderr as `portlease: …` with exit status 2 (3: a bind failed).

use std::io::BufRead;
use std::net::TcpListener;
use std::process::exit;

fn fail(what: impl std::fmt::Display, status: i32) -> ! {
    eprintln!("portlease: {what}");
    exit(status)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [leases, size] = args.as_slice() else { fail("usage: holder LEASES SIZE", 64) };
    let (leases, size): (usize, u16) = match (leases.parse(), size.parse()) {
        (Ok(l), Ok(s)) => (l, s),
        _ => fail("usage: holder LEASES SIZE", 64),
    };
    let client = portlease::Client::connect().unwrap_or_else(|e| fail(e, 2));
    let mut guards = Vec::new();
    let mut all: Vec<Vec<u16>> = Vec::new();
    for i in 0..leases {
        if i % 2 == 0 {
            let base = portlease::port_alloc(size).unwrap_or_else(|e| fail(e, 2));
            all.push((base..base + size).collect());
        } else {
            let lease = client.lease(size).unwrap_or_else(|e| fail(e, 2));
            all.push(lease.ports().to_vec());
            guards.push(lease);
        }
    }
    let mut listeners = Vec::new();
    for port in all.iter().flatten() {
        match TcpListener::bind(("127.0.0.1", *port)) {
            Ok(l) => listeners.push(l),
            Err(e) => fail(format!("cannot bind leased port {port}: {e}"), 3),
        }
    }
    println!("{}", serde_json::json!({"pid": std::process::id(), "leases": all}));
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "check" {
            let lost = guards.iter().map(|g| g.check()).find_map(Result::err);
            let held = client.held().len() + portlease::port_alloc_client().map_or(0, |c| c.held().len());
            match lost {
                Some(e) => println!("lost: {e}"),
                None if held != leases => println!("lost: {held} of {leases} leases held"),
                None => println!("ok"),
            }
        }
    }
    drop(listeners);
}
