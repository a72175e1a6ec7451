//! Chat servers: rooms, membership and fan-out ([`server`]), over the room data in [`rooms`]; deliveries
//! of one drain of the inbox are merged in [`batch`].

pub mod batch;
pub mod rooms;
pub mod server;
