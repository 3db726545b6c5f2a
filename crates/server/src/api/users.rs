//! `/api/users`: the caller, pepper rotation, user creation by a site administrator, and the
//! caller's own audit log.

use axum::extract::State;
use axum::http::StatusCode;
use kilocloud_identity::Owner;
use kilocloud_identity::model::{ApiKeyView, OrgMembershipView, UserView};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{AuditPage, AuditQuery, ErrorBody};
use crate::auth::{AuthUser, PersonalAuth, SiteAdmin};
use crate::error::Query;
use crate::{ApiError, AppState, Json};

/// The caller: who they are, how they authenticated, and their organizations.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Me {
    /// The user.
    pub user: UserView,
    /// `jwt` or `api_key`.
    pub credential: &'static str,
    /// The organization the credential is pinned to, if any.
    pub pinned_organization_id: Option<uuid::Uuid>,
    /// The bot the credential acts as, if any.
    pub bot_id: Option<uuid::Uuid>,
    /// Organizations the user belongs to, with roles; for a credential pinned to an
    /// organization or a bot's, only the pinned one.
    pub organizations: Vec<OrgMembershipView>,
}

/// `GET /api/users/me`
#[utoipa::path(get, path = "/api/users/me", tag = "users",
    responses((status = 200, body = Me), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn me(State(s): State<AppState>, auth: AuthUser) -> Result<Json<Me>, ApiError> {
    let p = &auth.principal;
    let user = s
        .identity
        .user(p.user)
        .await?
        .ok_or_else(|| ApiError::not_found("user not found"))?;
    Ok(Json(Me {
        user: UserView::from(&user),
        credential: match p.credential {
            kilocloud_identity::Credential::Jwt => "jwt",
            kilocloud_identity::Credential::ApiKey(_) => "api_key",
        },
        pinned_organization_id: p.pinned_org,
        bot_id: p.bot,
        // A pinned or bot credential sees only what it may act for, not all of the user's.
        organizations: match p.is_personal() {
            true => s.identity.orgs_of(p.user).await?,
            false => {
                let mut orgs = s.identity.orgs_of(p.user).await?;
                orgs.retain(|o| Some(o.org.id) == p.pinned_org);
                orgs
            }
        },
    }))
}

/// `POST /api/users/me/rotate-pepper`: revokes every JWT of the caller (API keys stay valid).
#[utoipa::path(post, path = "/api/users/me/rotate-pepper", tag = "users",
    responses((status = 204, description = "Rotated; every earlier JWT is revoked"),
        (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate_pepper(
    State(s): State<AppState>,
    PersonalAuth(auth): PersonalAuth,
) -> Result<StatusCode, ApiError> {
    s.identity
        .rotate_pepper(auth.principal.user, &auth.initiator())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /api/users`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateUser {
    /// Email, unique.
    pub email: String,
    /// Display name; default: the email's local part.
    pub name: Option<String>,
    /// Make the user a site administrator. Default false.
    #[serde(default)]
    pub is_admin: bool,
}

/// A created user and their first API key (shown once).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedUser {
    /// The user.
    pub user: UserView,
    /// The API key, `kc_…`; store it now, it cannot be shown again.
    pub api_key: String,
    /// The key's record.
    pub api_key_info: ApiKeyView,
}

/// `POST /api/users` (site administrators): creates a user and a first API key for them.
#[utoipa::path(post, path = "/api/users", tag = "users", request_body = CreateUser,
    responses((status = 201, body = CreatedUser), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_user(
    State(s): State<AppState>,
    SiteAdmin(admin): SiteAdmin,
    Json(body): Json<CreateUser>,
) -> Result<(StatusCode, Json<CreatedUser>), ApiError> {
    let name = body
        .name
        .clone()
        .unwrap_or_else(|| body.email.split('@').next().unwrap_or_default().to_owned());
    let (user, api_key, info) = s
        .identity
        .create_user(&body.email, &name, body.is_admin, &admin.initiator())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedUser {
            user: UserView::from(&user),
            api_key,
            api_key_info: info,
        }),
    ))
}

/// `GET /api/users/me/audit`: the caller's own audit log (their keys, secrets, pepper).
#[utoipa::path(get, path = "/api/users/me/audit", tag = "users", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn my_audit(
    State(s): State<AppState>,
    PersonalAuth(auth): PersonalAuth,
    Query(q): Query<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let entries = s
        .identity
        .audit(Owner::User(auth.principal.user), q.before, q.limit()?)
        .await?;
    Ok(Json(AuditPage { entries }))
}
