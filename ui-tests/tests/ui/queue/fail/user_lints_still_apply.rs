//! The attribute neither silences the user's own lints on the item it re-emits nor adds lints
//! of its own: only the user's undocumented type and its non-camel-case name are reported.
#![deny(missing_docs, non_camel_case_types)]

#[derive(serde::Serialize, serde::Deserialize)]
#[outbox::queue(partitions = 2)]
pub struct order_placed {
    #[outbox(key)]
    id: i64,
}

/// A documented handler: nothing to report about it or its registration.
#[outbox::handler(leased)]
pub async fn handle(msg: order_placed) -> Result<(), outbox::HandlerError> {
    let _ = msg.id;
    Ok(())
}

fn main() {}
