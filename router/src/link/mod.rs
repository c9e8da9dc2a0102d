//! Links: transports, and the tasks that bring links up and keep them alive.
//!
//! - [`transport`]: the trait a link's carrier implements (streams with finish and reset);
//! - [`tls`]: TLS over TCP with HTTP/2 streams;
//! - `dial` / `accept`: how a link comes up on the linking and the accepting side;
//! - `session`: what runs while it is up (heartbeats, RTT, certificate renewal).

pub(crate) mod accept;
mod control;
pub(crate) mod dial;
mod session;
pub mod tls;
pub mod transport;
