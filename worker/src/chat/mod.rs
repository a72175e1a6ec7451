//! Chat servers: rooms, membership and fan-out.
//!
//! - [`server`]: the cluster RPC listener and one task per connector link;
//! - [`rooms_task`]: the one task that owns the rooms, answers requests and sends deliveries;
//! - [`presence`]: when a connector counts as gone (its link and the membership, each with a grace);
//! - [`history`]: each room's numbered messages (epoch and offset), for recovery and paging;
//! - [`room_table`]: the rooms as plain data (who is where, the pushes each change causes);
//! - [`batch`]: deliveries of one drain of the inbox merged per room and connector, and their pacing.

pub mod batch;
pub mod history;
pub mod outbox;
pub mod presence;
pub mod room_table;
pub mod rooms_task;
pub mod server;
