//! The expansions use absolute paths only: a module that shadows prelude names and `outbox`,
//! and a renamed `outbox` crate through `crate = "…"`, still compile.

extern crate outbox as renamed_outbox;

#[allow(dead_code, non_camel_case_types)]
mod hostile {
    struct Result;
    struct Option;
    struct Box;
    struct Some;
    struct Ok;
    struct Send;
    struct Future;
    struct Pin;
    struct u32; // `str` is left alone: serde_derive itself names `&str`
    mod outbox {}
    mod inventory {}
    mod core {}

    #[derive(serde::Serialize, serde::Deserialize)]
    #[::outbox::queue(partitions = 3)]
    pub(crate) struct Shadowed {
        #[outbox(key)]
        pub(crate) id: i64,
    }

    #[::outbox::handler(leased)]
    async fn shadowed_leased(
        msg: Shadowed,
        ctx: &::outbox::LeaseContext,
    ) -> ::core::result::Result<(), ::outbox::HandlerError> {
        let _ = (msg.id, ctx);
        ::core::result::Result::Ok(())
    }

    #[derive(Clone)]
    pub(crate) struct Config;

    #[::outbox::handler(leased)]
    async fn shadowed_stateful(
        _msg: Shadowed,
        _config: ::outbox::State<Config>,
    ) -> ::core::result::Result<(), ::outbox::HandlerError> {
        ::core::result::Result::Ok(())
    }

    #[::outbox::handler(transactional)]
    async fn shadowed_tx(
        _msg: Shadowed,
        _txn: &::outbox::sea_orm::DatabaseTransaction,
    ) -> ::core::result::Result<(), ::outbox::HandlerError> {
        ::core::result::Result::Ok(())
    }
}

/// Through the renamed crate, with `crate = "…"` pointing at it.
mod renamed {
    #[derive(serde::Serialize, serde::Deserialize)]
    #[renamed_outbox::queue(partitions = 2, crate = "renamed_outbox")]
    pub(crate) struct Renamed(pub(crate) u8);

    #[renamed_outbox::handler(leased, crate = "renamed_outbox")]
    async fn renamed_handler(_msg: Renamed) -> Result<(), renamed_outbox::HandlerError> {
        Ok(())
    }
}

fn main() {
    use renamed_outbox::Queue;
    assert_eq!(hostile::Shadowed::NAME, "shadowed");
    assert_eq!(
        hostile::Shadowed { id: 1 }.partition(),
        renamed_outbox::partition_for_key(&1, 3)
    );
    assert_eq!(renamed::Renamed::NAME, "renamed");
    assert!(renamed::Renamed(0).partition() < 2);
    assert_eq!(renamed_outbox::handlers().len(), 4);
}
