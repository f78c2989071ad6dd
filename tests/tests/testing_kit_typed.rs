//! The testing kit with typed queues and handlers: tests of one binary each use a kit in
//! parallel, on current-thread and multi-thread runtimes, without seeing each other's messages
//! (a handler's typed enqueue goes to the outbox that runs it).

use outbox::testing::{Fault, TestKit};
use outbox::{HandlerError, LeaseContext, Queue};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[outbox::queue(partitions = 2)]
struct Greeting {
    #[outbox(key)]
    to: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[outbox::queue(partitions = 1)]
struct Reply {
    to: String,
}

/// Replies to each greeting through the current outbox: the one running this handler.
#[outbox::handler(leased)]
async fn reply(msg: Greeting, _ctx: &LeaseContext) -> Result<(), HandlerError> {
    let outbox =
        outbox::global().ok_or_else(|| HandlerError::retry(std::io::Error::other("no outbox")))?;
    Reply { to: msg.to }.enqueue(outbox.db()).await?;
    Ok(())
}

async fn greet(names: &[&str]) {
    for round in 0..3 {
        let kit = TestKit::new().await.expect("kit");
        for n in names {
            Greeting {
                to: (*n).to_owned(),
            }
            .enqueue(kit.db())
            .await
            .expect("enqueue");
            tokio::task::yield_now().await;
        }
        if round == 1 {
            kit.inject("reply", Fault::Fail);
        }
        kit.run_until_idle().await.expect("idle");
        let mut got: Vec<String> = kit
            .enqueued::<Reply>()
            .await
            .expect("replies")
            .into_iter()
            .map(|r| r.to)
            .collect();
        got.sort();
        assert_eq!(got, names, "round {round}");
        assert_eq!(
            kit.enqueued::<Greeting>().await.expect("greetings").len(),
            names.len()
        );
    }
}

#[tokio::test]
async fn a_kit_per_test_a() {
    greet(&["ann", "bob"]).await;
}

#[tokio::test]
async fn a_kit_per_test_b() {
    greet(&["cy", "dee", "eve"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kit_per_test_on_a_multi_thread_runtime_c() {
    greet(&["fay", "gus"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kit_per_test_on_a_multi_thread_runtime_d() {
    greet(&["hal", "ivy", "jo", "kim"]).await;
}
