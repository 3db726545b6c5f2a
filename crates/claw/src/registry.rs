//! The instance registry (`claw_registry`, one actor per owner): a row per instance (id,
//! owner, user, organization, sandbox id, name, created, destroyed) for listing and for
//! recovery when an instance actor's state is lost. The instance actor is the authority on
//! everything else (reference kilo-cloud.md §2: Postgres rows are written first, soft-deleted
//! on destroy and restored when the destroy call fails).

use kilocloud_substrate::{Actor, ActorContext, Result, UnixMs};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ClawError;

/// Storage key prefix of a row: `inst:<instance id>`.
pub const ROW_PREFIX: &str = "inst:";

/// One instance's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRow {
    /// Instance id (for a legacy instance: the user id).
    pub id: Uuid,
    /// Owner key.
    pub owner: String,
    /// The user it was created for.
    pub user_id: Uuid,
    /// The owning organization.
    pub org_id: Option<Uuid>,
    /// Sandbox id.
    pub sandbox_id: String,
    /// Display name.
    pub name: String,
    /// Created, ms since epoch.
    pub created_at: UnixMs,
    /// Destroyed (soft delete), ms since epoch.
    pub destroyed_at: Option<UnixMs>,
}

/// A call on an owner's registry.
#[derive(Debug)]
pub enum RegistryCall {
    /// Adds a row, replacing a destroyed one with the same id (a legacy instance's id is its
    /// user's, reused after a destroy); refused beyond `limit` active rows or for an active
    /// duplicate id.
    Insert {
        /// The row.
        row: InstanceRow,
        /// Most active instances the owner may have.
        limit: u32,
    },
    /// Sets or clears `destroyed_at`.
    SetDestroyed {
        /// Instance id.
        id: Uuid,
        /// The time, or `None` to restore the row.
        at: Option<UnixMs>,
    },
    /// Removes a row outright (a provision that was refused before it created anything).
    Remove {
        /// Instance id.
        id: Uuid,
    },
}

/// The actor type.
pub struct RegistryActor;

impl Actor for RegistryActor {
    const TYPE: &'static str = "claw_registry";
    type Call = RegistryCall;
    type Reply = std::result::Result<(), ClawError>;

    async fn call(
        &self,
        ctx: &mut ActorContext,
        call: RegistryCall,
    ) -> Result<std::result::Result<(), ClawError>> {
        match call {
            RegistryCall::Insert { row, limit } => {
                let key = format!("{ROW_PREFIX}{}", row.id);
                if ctx
                    .get::<InstanceRow>(&key)
                    .await?
                    .is_some_and(|r| r.destroyed_at.is_none())
                {
                    return Ok(Err(ClawError::Conflict(format!(
                        "instance {} already exists",
                        row.id
                    ))));
                }
                let rows: Vec<(String, InstanceRow)> = ctx.list(ROW_PREFIX).await?;
                let active = rows
                    .iter()
                    .filter(|(_, r)| r.destroyed_at.is_none())
                    .count();
                if active >= limit as usize {
                    return Ok(Err(ClawError::Limit(format!(
                        "the owner already has {active} instances (claw.max_instances_per_owner = {limit})"
                    ))));
                }
                ctx.put(&key, &row)?;
                Ok(Ok(()))
            }
            RegistryCall::SetDestroyed { id, at } => {
                let key = format!("{ROW_PREFIX}{id}");
                let Some(mut row) = ctx.get::<InstanceRow>(&key).await? else {
                    return Ok(Err(ClawError::NotFound));
                };
                row.destroyed_at = at;
                ctx.put(&key, &row)?;
                Ok(Ok(()))
            }
            RegistryCall::Remove { id } => {
                ctx.delete(&format!("{ROW_PREFIX}{id}"));
                Ok(Ok(()))
            }
        }
    }
}
