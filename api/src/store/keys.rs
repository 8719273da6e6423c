//! `account` and `api_key`: the configured accounts and keys as rows (ids that other tables
//! refer to), kept in step with the configuration by [`sync`].
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use entity::{account, api_key, credit_wallet};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr,
    EntityTrait, QueryFilter, QuerySelect, TryInsertResult,
};

use super::ledger::NewEntry;
use crate::domain::ids::AccountId;
use crate::domain::money::LedgerKind;
use crate::settings::{AccountPolicy, Settings};

/// The database ids of the configured accounts and keys, by name (what the sync returns).
#[derive(Clone, Debug, Default)]
pub struct SyncedIds {
    /// `account.id` by account name.
    pub accounts: HashMap<String, i64>,
    /// `api_key.id` by key name.
    pub keys: HashMap<String, i64>,
}

/// Upserts every configured account and key by name, disables those no longer configured, and
/// grants an account's `initial_credits` once, when the account is first created. A key moved
/// to another account keeps its id; what it created stays with the account it had. Returns the
/// ids by name.
pub async fn sync(db: &DatabaseConnection, settings: &Settings) -> Result<SyncedIds, DbErr> {
    let txn = crate::db::begin_write(db).await?;
    let now = Utc::now();
    let mut ids = SyncedIds::default();
    for (name, policy) in &settings.accounts {
        let id = sync_account(&txn, name, policy, now).await?;
        ids.accounts.insert(name.clone(), id);
    }
    for (name, policy) in &settings.keys {
        let account_id = *ids
            .accounts
            .get(&policy.account.name)
            .ok_or_else(|| DbErr::RecordNotFound(format!("account {}", policy.account.name)))?;
        let am = api_key::ActiveModel {
            name: Set(name.clone()),
            key_sha256: Set(policy.key_sha256.clone()),
            disabled: Set(policy.disabled),
            account_id: Set(Some(account_id)),
            created_at: Set(now),
            updated_at: Set(now),
            ..Default::default()
        };
        let inserted = api_key::Entity::insert(am)
            .on_conflict_do_nothing_on([api_key::Column::Name])
            .exec(&txn)
            .await?;
        let id = match inserted {
            TryInsertResult::Inserted(r) => {
                tracing::info!(key = %name, account = %policy.account.name, "key created");
                r.last_insert_id
            }
            _ => {
                let existing = api_key::Entity::find()
                    .filter(api_key::Column::Name.eq(name.as_str()))
                    .one(&txn)
                    .await?
                    .ok_or_else(|| DbErr::RecordNotFound(format!("api_key {name}")))?;
                if existing.key_sha256 != policy.key_sha256
                    || existing.disabled != policy.disabled
                    || existing.account_id != Some(account_id)
                {
                    if existing.account_id.is_some_and(|a| a != account_id) {
                        tracing::info!(key = %name, account = %policy.account.name, "key moved to another account");
                    }
                    api_key::Entity::update(api_key::ActiveModel {
                        id: Set(existing.id),
                        key_sha256: Set(policy.key_sha256.clone()),
                        disabled: Set(policy.disabled),
                        account_id: Set(Some(account_id)),
                        updated_at: Set(now),
                        ..Default::default()
                    })
                    .exec(&txn)
                    .await?;
                }
                existing.id
            }
        };
        ids.keys.insert(name.clone(), id);
    }
    // Accounts and keys removed from config are disabled, never deleted, so their history
    // stays.
    let configured: Vec<String> = settings.accounts.keys().cloned().collect();
    account::Entity::update_many()
        .col_expr(
            account::Column::Disabled,
            sea_orm::sea_query::Expr::value(true),
        )
        .col_expr(
            account::Column::UpdatedAt,
            sea_orm::sea_query::Expr::value(now),
        )
        .filter(account::Column::Name.is_not_in(configured))
        .filter(account::Column::Disabled.eq(false))
        .exec(&txn)
        .await?;
    let configured: Vec<String> = settings.keys.keys().cloned().collect();
    api_key::Entity::update_many()
        .col_expr(
            api_key::Column::Disabled,
            sea_orm::sea_query::Expr::value(true),
        )
        .col_expr(
            api_key::Column::UpdatedAt,
            sea_orm::sea_query::Expr::value(now),
        )
        .filter(api_key::Column::Name.is_not_in(configured))
        .filter(api_key::Column::Disabled.eq(false))
        .exec(&txn)
        .await?;
    txn.commit().await?;
    Ok(ids)
}

/// Upserts one account by name; a new one gets its wallet and `initial_credits`.
async fn sync_account(
    txn: &DatabaseTransaction,
    name: &str,
    policy: &AccountPolicy,
    now: DateTime<Utc>,
) -> Result<i64, DbErr> {
    let inserted = account::Entity::insert(account::ActiveModel {
        name: Set(name.to_string()),
        disabled: Set(policy.disabled),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    })
    .on_conflict_do_nothing_on([account::Column::Name])
    .exec(txn)
    .await?;
    if let TryInsertResult::Inserted(r) = inserted {
        let id = r.last_insert_id;
        credit_wallet::Entity::insert(credit_wallet::ActiveModel {
            api_key_id: Set(id),
            balance: Set(0),
            held: Set(0),
            updated_at: Set(now),
        })
        .exec(txn)
        .await?;
        if policy.initial_credits > 0 {
            let grant = NewEntry::new(id, LedgerKind::Grant, policy.initial_credits)
                .note(Some("initial_credits from config"));
            super::ledger::apply(txn, grant).await?;
        }
        tracing::info!(account = %name, id, "account created");
        return Ok(id);
    }
    let existing = account::Entity::find()
        .filter(account::Column::Name.eq(name))
        .one(txn)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("account {name}")))?;
    if existing.disabled != policy.disabled {
        account::Entity::update(account::ActiveModel {
            id: Set(existing.id),
            disabled: Set(policy.disabled),
            updated_at: Set(now),
            ..Default::default()
        })
        .exec(txn)
        .await?;
    }
    Ok(existing.id)
}

/// The ids of the configured accounts and keys as the database holds them, read only: what a
/// node that follows another node's reload indexes its configuration with (the reloading node
/// synced them). Names the database does not hold are left out.
pub async fn ids<C: ConnectionTrait>(db: &C, settings: &Settings) -> Result<SyncedIds, DbErr> {
    let accounts: Vec<String> = settings.accounts.keys().cloned().collect();
    let keys: Vec<String> = settings.keys.keys().cloned().collect();
    Ok(SyncedIds {
        accounts: account::Entity::find()
            .select_only()
            .column(account::Column::Name)
            .column(account::Column::Id)
            .filter(account::Column::Name.is_in(accounts))
            .into_tuple::<(String, i64)>()
            .all(db)
            .await?
            .into_iter()
            .collect(),
        keys: api_key::Entity::find()
            .select_only()
            .column(api_key::Column::Name)
            .column(api_key::Column::Id)
            .filter(api_key::Column::Name.is_in(keys))
            .into_tuple::<(String, i64)>()
            .all(db)
            .await?
            .into_iter()
            .collect(),
    })
}

/// Counts a reload (a sync of the configuration into the database) and returns the count.
pub async fn count_reload<C: ConnectionTrait>(db: &C) -> Result<i64, DbErr> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(super::sql::stmt(
            backend,
            "UPDATE config_reload SET generation = generation + 1, updated_at = $1 \
             WHERE id = 1 RETURNING generation",
            [Utc::now().into()],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("config_reload".into()))?;
    row.try_get("", "generation")
}

/// The count of reloads so far (by any node).
pub async fn reload_count<C: ConnectionTrait>(db: &C) -> Result<i64, DbErr> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(super::sql::stmt(
            backend,
            "SELECT generation FROM config_reload WHERE id = 1",
            [],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("config_reload".into()))?;
    row.try_get("", "generation")
}

/// Finds an account id by name, configured or not.
pub async fn account_id_by_name<C: ConnectionTrait>(
    db: &C,
    name: &str,
) -> Result<Option<AccountId>, DbErr> {
    Ok(account::Entity::find()
        .filter(account::Column::Name.eq(name))
        .one(db)
        .await?
        .map(|a| AccountId(a.id)))
}

/// The account of a key found by name, configured or not: its id and name, in one read.
pub async fn account_of_key<C: ConnectionTrait>(
    db: &C,
    name: &str,
) -> Result<Option<(AccountId, String)>, DbErr> {
    let row = db
        .query_one_raw(super::sql::stmt(
            db.get_database_backend(),
            "SELECT a.id, a.name FROM api_key k JOIN account a ON a.id = k.account_id \
             WHERE k.name = $1",
            [name.into()],
        ))
        .await?;
    row.map(|r| Ok((AccountId(r.try_get("", "id")?), r.try_get("", "name")?)))
        .transpose()
}

/// Names of the keys by id (configured or not), for reports that break an account down by key.
pub async fn names<C: ConnectionTrait>(
    db: &C,
    ids: &[i64],
) -> Result<std::collections::HashMap<i64, String>, DbErr> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    Ok(api_key::Entity::find()
        .select_only()
        .column(api_key::Column::Id)
        .column(api_key::Column::Name)
        .filter(api_key::Column::Id.is_in(ids.iter().copied()))
        .into_tuple::<(i64, String)>()
        .all(db)
        .await?
        .into_iter()
        .collect())
}

/// Ids of the keys disabled in the database (by any node's reload or key sync).
pub async fn disabled_ids<C: ConnectionTrait>(
    db: &C,
) -> Result<std::collections::HashSet<i64>, DbErr> {
    Ok(api_key::Entity::find()
        .select_only()
        .column(api_key::Column::Id)
        .filter(api_key::Column::Disabled.eq(true))
        .into_tuple::<i64>()
        .all(db)
        .await?
        .into_iter()
        .collect())
}

/// Finds a key id by name, configured or not.
pub async fn id_by_name<C: ConnectionTrait>(db: &C, name: &str) -> Result<Option<i64>, DbErr> {
    Ok(api_key::Entity::find()
        .filter(api_key::Column::Name.eq(name))
        .one(db)
        .await?
        .map(|k| k.id))
}

/// Takes the account rows of `ids` that no other transaction holds, for a claim that counts and
/// leases those accounts' items alone (see `service::leases`); returns the ids taken. Never waits.
pub async fn lock_for_claim<C: ConnectionTrait>(txn: &C, ids: &[i64]) -> Result<Vec<i64>, DbErr> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let backend = txn.get_database_backend();
    let sql = format!(
        "SELECT id FROM account WHERE id IN ({}) ORDER BY id{}",
        super::sql::id_list(ids),
        super::sql::skip_locked_no_key(backend)
    );
    txn.query_all_raw(super::sql::stmt(backend, &sql, []))
        .await?
        .into_iter()
        .map(|r| r.try_get::<i64>("", "id"))
        .collect()
}
