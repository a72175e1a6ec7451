//! pomelo-rs workers: gate, connector and chat.
//!
//! [`runtime::run`] is a worker's whole life; [`roles`] decides what each server type serves;
//! [`control`] is the link to the master.
// Module list: the lead's modules (control, logwriter, roles, runtime) and the protocol modules.

pub mod chat;
pub mod chat_client;
pub mod cluster_rooms;
pub mod connector;
pub mod control;
pub mod frontend;
pub mod gate;
pub mod logwriter;
pub mod roles;
pub mod runtime;
