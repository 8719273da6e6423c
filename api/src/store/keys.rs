//! `api_key`: the configured keys as rows (ids that other tables refer to), kept in step
//! with the configuration by [`sync`].
use std::collections::HashMap;

use chrono::Utc;
use entity::{api_key, credit_wallet};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, QuerySelect, TryInsertResult,
};

use super::ledger::NewEntry;
use crate::domain::money::LedgerKind;
use crate::settings::Settings;

/// Upserts every configured key by name, disables keys no longer configured, and grants
/// `initial_credits` once, when a key is first created. Returns name → id.
pub async fn sync(
    db: &DatabaseConnection,
    settings: &Settings,
) -> Result<HashMap<String, i64>, DbErr> {
    let txn = crate::db::begin_write(db).await?;
    let now = Utc::now();
    let mut ids = HashMap::new();
    for (name, policy) in &settings.keys {
        let am = api_key::ActiveModel {
            name: Set(name.clone()),
            key_sha256: Set(policy.key_sha256.clone()),
            disabled: Set(policy.disabled),
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
                let id = r.last_insert_id;
                credit_wallet::Entity::insert(credit_wallet::ActiveModel {
                    api_key_id: Set(id),
                    balance: Set(0),
                    held: Set(0),
                    updated_at: Set(now),
                })
                .exec(&txn)
                .await?;
                if policy.initial_credits > 0 {
                    let grant = NewEntry::new(id, LedgerKind::Grant, policy.initial_credits)
                        .note(Some("initial_credits from config"));
                    super::ledger::apply(&txn, grant).await?;
                }
                tracing::info!(key = %name, id, "key created");
                id
            }
            _ => {
                let existing = api_key::Entity::find()
                    .filter(api_key::Column::Name.eq(name.as_str()))
                    .one(&txn)
                    .await?
                    .ok_or_else(|| DbErr::RecordNotFound(format!("api_key {name}")))?;
                if existing.key_sha256 != policy.key_sha256 || existing.disabled != policy.disabled
                {
                    api_key::Entity::update(api_key::ActiveModel {
                        id: Set(existing.id),
                        key_sha256: Set(policy.key_sha256.clone()),
                        disabled: Set(policy.disabled),
                        updated_at: Set(now),
                        ..Default::default()
                    })
                    .exec(&txn)
                    .await?;
                }
                existing.id
            }
        };
        ids.insert(name.clone(), id);
    }
    // Keys removed from config are disabled, never deleted, so their history stays.
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

/// Takes the rows of `ids` that no other transaction holds, for a claim that counts and
/// leases those keys' items alone (see `service::leases`); returns the ids taken. Never waits.
pub async fn lock_for_claim<C: ConnectionTrait>(txn: &C, ids: &[i64]) -> Result<Vec<i64>, DbErr> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let backend = txn.get_database_backend();
    let sql = format!(
        "SELECT id FROM api_key WHERE id IN ({}) ORDER BY id{}",
        super::sql::id_list(ids),
        super::sql::skip_locked_no_key(backend)
    );
    txn.query_all_raw(super::sql::stmt(backend, &sql, []))
        .await?
        .into_iter()
        .map(|r| r.try_get::<i64>("", "id"))
        .collect()
}
