//! pomelo-rs workers: gate, connector and chat.
//!
//! - [`runtime::run`] is a worker's whole life: bind, start the role, stay on the [`control`] link to
//!   the master, drain on stop;
//! - [`roles`]: what each server type serves on its listeners ([`roles::RoleContext`] is its input);
//! - [`routes`]: every handler route, the route dictionary and the uid format, shared by all roles;
//! - the three server types: [`gate`] (queryEntry), [`connector`] (the handler, its cluster rooms, the
//!   RPC links to the chat servers and the pure placement rules) and [`chat`] (the RPC listener, the
//!   rooms task, the room table and the delivery batches);
//! - [`frontend`]: the shared client-port engine of the gate and the connector (Pomelo's "frontend"):
//!   connections, the protocol state machine, WebSocket and raw TCP, sessions and their queues;
//! - [`logwriter`]: the worker's log file.
//!
//! Dependencies run one way: roles → server types → frontend; nothing below imports what is above it.

pub mod chat;
pub mod connector;
pub mod control;
pub mod frontend;
pub mod gate;
pub mod logwriter;
pub mod roles;
pub mod routes;
pub mod runtime;
