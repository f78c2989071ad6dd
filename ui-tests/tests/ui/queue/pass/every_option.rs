//! Every `#[outbox::queue]` and `#[outbox::handler]` option is accepted, and the declarations
//! reach the registry with the values written.

use std::time::Duration;

use outbox::sea_orm::DatabaseTransaction;
use outbox::{HandlerError, HandlerMode, LeaseContext, Overrides, PoisonPolicy, Queue};
use serde::{Deserialize, Serialize};

/// Default name: the type name in snake case.
#[derive(Serialize, Deserialize)]
#[outbox::queue(partitions = 8)]
struct OrderPlaced {
    #[outbox(key)]
    customer_id: i64,
    total_cents: i64,
}

/// Every queue option; the queue attribute before the derive works too.
#[outbox::queue(
    partitions = 4096,
    name = "emails.v2",
    max_attempts = 3,
    poison = "block",
    batch_size = 10,
    concurrency = 4,
    crate = "::outbox"
)]
#[derive(Serialize, Deserialize)]
struct Email(#[outbox(key, header = "to")] String, u32);

/// A deduplication key (any field with a `Display` text), headers from fields, and a delay
/// for every message.
#[derive(Serialize, Deserialize)]
#[outbox::queue(partitions = 4, delay_ms = 900_000)]
struct Reminder {
    #[outbox(key, header)]
    user_id: u64,
    #[outbox(dedup)]
    #[outbox(header = "request.id")]
    request_id: u64,
    #[outbox(header)]
    r#type: String,
}

/// A strict-order queue: commit order only, scheduled delivery refused.
#[derive(Serialize, Deserialize)]
#[outbox::queue(partitions = 4, strict_order)]
struct LedgerEntry {
    #[outbox(key)]
    account: String,
    #[outbox(dedup)]
    entry_id: String,
}

/// An enum without a key: spread over the partitions.
#[derive(Serialize, Deserialize)]
#[outbox::queue(partitions = 2, poison = "dead_letter")]
enum HTTPEvent {
    Started { id: u64 },
    Stopped,
}

#[outbox::handler(transactional)]
async fn project(msg: OrderPlaced, txn: &DatabaseTransaction) -> Result<(), HandlerError> {
    let _ = (msg.customer_id, msg.total_cents, txn);
    Ok(())
}

#[outbox::handler(
    transactional,
    name = "project-again",
    max_attempts = 7,
    batch_size = 50,
    concurrency = 2,
    crate = "::outbox"
)]
async fn project_again(
    _: OrderPlaced,
    _txn: &outbox::sea_orm::DatabaseTransaction,
) -> Result<(), HandlerError> {
    Ok(())
}

#[outbox::handler(leased, lease_ms = 60_000, max_attempts = 2)]
async fn send_email(msg: Email, ctx: &LeaseContext) -> Result<(), HandlerError> {
    let _ = (msg.0, msg.1, ctx.remaining());
    Ok(())
}

/// A leased handler may omit its context.
#[outbox::handler(leased)]
async fn log_event(msg: HTTPEvent) -> Result<(), HandlerError> {
    if let HTTPEvent::Started { id } = msg {
        let _ = id;
    }
    Ok(())
}

fn main() {
    assert_eq!(OrderPlaced::NAME, "order_placed");
    assert_eq!(OrderPlaced::PARTITIONS, 8);
    assert_eq!(<HTTPEvent as Queue>::NAME, "http_event");
    assert_eq!(Email::NAME, "emails.v2");
    assert_eq!(Email::PARTITIONS, 4096);
    let key = OrderPlaced {
        customer_id: 7,
        total_cents: 1,
    };
    assert_eq!(key.partition(), outbox::partition_for_key(&7_i64, 8));
    let email = Email("a@example.com".into(), 1);
    assert_eq!(
        email.partition(),
        outbox::partition_for_key("a@example.com", 4096)
    );
    assert!(HTTPEvent::Stopped.partition() < 2);

    let reminder = Reminder {
        user_id: 1,
        request_id: 42,
        r#type: "trial".into(),
    };
    assert_eq!(reminder.dedup_key().as_deref(), Some("42"));
    let headers = reminder.headers();
    assert_eq!(headers.len(), 3);
    assert_eq!(headers.get("user_id"), Some("1"));
    assert_eq!(headers.get("request.id"), Some("42"));
    assert_eq!(headers.get("type"), Some("trial"));
    assert_eq!(email.headers().get("to"), Some("a@example.com"));
    assert!(OrderPlaced { customer_id: 1, total_cents: 1 }.headers().is_empty());
    assert_eq!(Reminder::DELAY, Some(Duration::from_secs(900)));
    assert!(Reminder::SCHEDULING);
    assert_eq!(OrderPlaced::DELAY, None);
    let entry = LedgerEntry {
        account: "a-1".into(),
        entry_id: "e-9".into(),
    };
    assert_eq!(entry.dedup_key().as_deref(), Some("e-9"));
    assert!(!LedgerEntry::SCHEDULING);
    assert_eq!(LedgerEntry::DELAY, None);

    let queues = outbox::queues();
    let names: Vec<_> = queues.iter().map(|q| q.name()).collect();
    assert_eq!(
        names,
        ["emails.v2", "http_event", "ledger_entry", "order_placed", "reminder"]
    );
    let email = queues[0];
    assert_eq!(email.poison_policy(), PoisonPolicy::Block);
    assert_eq!(
        email.get_overrides(),
        Overrides::NONE
            .max_attempts(3)
            .batch_size(10)
            .concurrency(4)
    );
    assert!(
        email.type_name().ends_with("::Email"),
        "{}",
        email.type_name()
    );
    assert_eq!(queues[1].poison_policy(), PoisonPolicy::DeadLetter);

    let handlers: Vec<_> = outbox::handlers()
        .iter()
        .map(|h| (h.queue(), h.name(), h.mode()))
        .collect();
    assert_eq!(
        handlers,
        [
            ("emails.v2", "send_email", HandlerMode::Leased),
            ("http_event", "log_event", HandlerMode::Leased),
            ("order_placed", "project", HandlerMode::Transactional),
            ("order_placed", "project-again", HandlerMode::Transactional),
        ]
    );
    let send_email = outbox::handlers()[0];
    assert_eq!(
        send_email.get_overrides(),
        Overrides::NONE
            .max_attempts(2)
            .lease(Duration::from_millis(60_000))
    );
    let spec = send_email.spec();
    assert_eq!((spec.queue(), spec.name()), ("emails.v2", "send_email"));
    let again = outbox::handlers()[3];
    assert_eq!(
        again.get_overrides(),
        Overrides::NONE
            .max_attempts(7)
            .batch_size(50)
            .concurrency(2)
    );
}
