//! The sans-IO core of the link protocol.
//!
//! Nothing here touches a socket, a task or the clock: every function is a function of its inputs
//! (time, where it matters, is passed in). The tokio side in [`crate::link`] only moves bytes
//! between these types and the network.
//!
//! What lives here:
//! - [`message`]: the control-stream messages (hello, ping/pong, certificate renewal) and their
//!   length-prefixed binary codec, which bounds every length and never panics on input;
//! - [`preface`]: the few bytes that open every link connection and every stream on a link;
//! - [`stream`]: the header of a carried connection's stream and the destination's answer;
//! - [`routing`]: link-state advertisements, the link-state database, least-cost paths;
//! - [`balance`]: the load-balancing choice among the sites that serve a routing key.

pub mod balance;
pub mod message;
pub mod preface;
pub mod routing;
pub mod stream;

pub use message::{ControlCodec, DecodeError, Message, MAX_FRAME};
pub use preface::{ConnPreface, ConnRole, PrefaceError, StreamKind};
