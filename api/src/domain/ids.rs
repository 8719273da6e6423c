//! Names in types: every id the service passes around has its own type, so that an item id
//! and a lease token (both UUIDs), or a key id and a count, can never be swapped silently.
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $inner);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$name> for sea_orm::Value {
            fn from(v: $name) -> Self {
                v.0.into()
            }
        }
    };
}

id_type!(
    /// A customer account (`account.id`): what owns wallets, ledgers, batches, rate-limit
    /// windows, webhooks and usage. Its tables name it in their `api_key_id` columns, from
    /// before accounts, when each key was its own account with the key's id.
    AccountId(i64)
);
id_type!(
    /// A customer key (`api_key.id`).
    KeyId(i64)
);
id_type!(
    /// A batch (`batch_job.id`).
    BatchId(Uuid)
);
id_type!(
    /// An item of a batch (`batch_item.id`).
    ItemId(Uuid)
);
id_type!(
    /// The token of one lease of an item: reports must present it.
    LeaseToken(Uuid)
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_bind_as_their_value() {
        let id = Uuid::now_v7();
        assert_eq!(ItemId(id).to_string(), id.to_string());
        assert_eq!(AccountId(7).to_string(), "7");
        assert_eq!(KeyId(7).to_string(), "7");
        assert_eq!(
            sea_orm::Value::from(LeaseToken(id)),
            sea_orm::Value::from(id)
        );
    }
}
