//! Chat servers: rooms, membership and fan-out ([`server`]), over the room data in [`rooms`].

pub mod rooms;
pub mod server;
