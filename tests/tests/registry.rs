//! Start-up reports every registry problem of the declarations in one binary at once:
//! duplicate queue names, duplicate handler names and handlers of undeclared queues.

use outbox::{HandlerError, Queue, RegistryProblem, StartError};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
#[outbox::queue(partitions = 2, name = "dup")]
struct First;

#[derive(Serialize, Deserialize)]
#[outbox::queue(partitions = 2, name = "dup")]
struct Second;

#[derive(Serialize, Deserialize)]
#[outbox::queue(partitions = 1)]
struct Fine;

/// A queue implemented by hand and never declared to the registry.
#[derive(Serialize, Deserialize)]
struct Undeclared;

impl Queue for Undeclared {
    const NAME: &'static str = "undeclared";
    const PARTITIONS: u32 = 1;
    fn partition(&self) -> u32 {
        0
    }
}

#[outbox::handler(leased)]
async fn same(_: First) -> Result<(), HandlerError> {
    Ok(())
}

#[outbox::handler(leased, name = "same")]
async fn same_again(_: Second) -> Result<(), HandlerError> {
    Ok(())
}

#[outbox::handler(leased)]
async fn orphan(_: Undeclared) -> Result<(), HandlerError> {
    Ok(())
}

#[outbox::handler(leased)]
async fn fine(_: Fine) -> Result<(), HandlerError> {
    Ok(())
}

async fn sqlite() -> (tempfile::TempDir, outbox::sea_orm::DatabaseConnection) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("registry.db").display()
    );
    let mut options = outbox::sea_orm::ConnectOptions::new(url);
    options.max_connections(4);
    let db = outbox::sea_orm::Database::connect(options)
        .await
        .expect("sqlite");
    (dir, db)
}

fn problems(r: Result<impl std::fmt::Debug, StartError>) -> Vec<RegistryProblem> {
    match r {
        Err(StartError::Registry(mut p)) => {
            p.sort_by_key(|p| format!("{p:?}"));
            p
        }
        other => panic!("expected registry problems, got {other:?}"),
    }
}

#[tokio::test]
async fn every_problem_is_reported_at_once() {
    let (_dir, db) = sqlite().await;
    let found = problems(outbox::start(db, outbox::Profile::Default).await);
    assert_eq!(
        found,
        [
            RegistryProblem::DuplicateHandler {
                queue: "dup".into(),
                handler: "same".into()
            },
            RegistryProblem::DuplicateQueue("dup".into()),
            RegistryProblem::HandlerWithoutQueue {
                queue: "undeclared".into(),
                handler: "orphan".into()
            },
        ]
    );
}

#[tokio::test]
async fn filters_select_declarations_and_keep_queues_for_producers() {
    let (_dir, db) = sqlite().await;
    // Selecting one handler still declares every queue: the duplicate queue is reported.
    let found = problems(
        outbox::discover(db.clone())
            .only_handlers(["fine"])
            .connect()
            .await,
    );
    assert_eq!(found, [RegistryProblem::DuplicateQueue("dup".into())]);

    // Excluding the duplicate queue drops its handlers too; `queue/name` filters work.
    let outbox = outbox::discover(db)
        .exclude_queue("dup")
        .exclude_handler("undeclared/orphan")
        .install_global(false)
        .connect()
        .await
        .expect("consistent declarations");
    assert_eq!(outbox.depth("fine").await.expect("depth").handlers.len(), 1);
    assert!(
        outbox::global().is_none(),
        "install_global(false) installs nothing"
    );
}
