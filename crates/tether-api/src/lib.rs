//! Tether's wire format (the JSON of SPEC §2, §3) and the HTTP client that the worker and the
//! CLI share. The server builds these types; nothing here touches a store.

pub mod client;
mod endpoints;
pub mod schema;
mod submit;
mod wire;

pub use client::{
    BoxStream, ClientError, ListRunsQuery, SseItem, TetherClient, WORKER_SECRET_HEADER,
};
pub use endpoints::*;
pub use submit::SubmitRequest;
pub use wire::*;
