//! The hybrid-vsock handshake reply (`OK <port>\n`), from a socket the VM's
//! host side (Cloud Hypervisor, vhost-device-vsock) answers: arbitrary
//! bytes through the shim's reader and check. Nothing past the newline may
//! be consumed (it is the ttrpc stream), the line is bounded, and only a
//! line starting with `OK ` is accepted.

#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use clh_agent_client::{check_reply, read_reply_line, HandshakeError, MAX_REPLY_LINE};
use libfuzzer_sys::fuzz_target;

const PORT: u32 = 1024;

/// Runs a future over an in-memory reader, which never waits.
fn ready<T>(f: impl Future<Output = T>) -> T {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("reading from memory waited"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut line = Vec::new();
    let result = ready(read_reply_line(&mut rest, PORT, &mut line));
    let newline = data.iter().position(|&b| b == b'\n');
    match result {
        Ok(()) => {
            let nl = newline.expect("a line accepted without its newline");
            assert!(nl <= MAX_REPLY_LINE, "a {nl}-byte line was accepted");
            assert_eq!(line, &data[..nl]);
            assert_eq!(
                rest,
                &data[nl + 1..],
                "bytes after the newline were consumed"
            );
            match check_reply(&line, PORT) {
                Ok(()) => assert!(line.starts_with(b"OK "), "accepted {line:?}"),
                Err(HandshakeError::Garbage { port, reply }) => {
                    assert!(!line.starts_with(b"OK "), "refused {line:?}");
                    assert_eq!(port, PORT);
                    assert!(reply.chars().count() <= 33, "untruncated {reply:?}");
                }
                Err(e) => panic!("unexpected error {e:?}"),
            }
        }
        Err(HandshakeError::PeerClosed { .. }) => assert!(data.is_empty()),
        Err(HandshakeError::Garbage { reply, .. }) => {
            assert!(newline.is_none() && !data.is_empty() && data.len() <= MAX_REPLY_LINE);
            assert!(reply.chars().count() <= 33, "untruncated {reply:?}");
        }
        Err(HandshakeError::LineTooLong { reply, .. }) => {
            assert!(data.len() > MAX_REPLY_LINE);
            assert!(!data[..=MAX_REPLY_LINE].contains(&b'\n'));
            assert!(reply.chars().count() <= 33, "untruncated {reply:?}");
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
    if let Err(e) = check_reply(data, PORT) {
        let _ = e.to_string();
    }
});
