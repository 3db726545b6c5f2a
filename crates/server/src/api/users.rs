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
    let (user, organizations) = caller(&s, p).await?;
    Ok(Json(Me {
        user,
        credential: match p.credential {
            kilocloud_identity::Credential::Jwt => "jwt",
            kilocloud_identity::Credential::ApiKey(_) => "api_key",
        },
        pinned_organization_id: p.pinned_org,
        bot_id: p.bot,
        organizations,
    }))
}

/// The caller's user and the organizations their credential may act for: all of the user's
/// for a personal credential, only the pinned one for a pinned or bot credential.
async fn caller(
    s: &AppState,
    p: &kilocloud_identity::Principal,
) -> Result<(UserView, Vec<OrgMembershipView>), ApiError> {
    let user = s
        .identity
        .user(p.user)
        .await?
        .ok_or_else(|| ApiError::not_found("user not found"))?;
    let mut orgs = s.identity.orgs_of(p.user).await?;
    if !p.is_personal() {
        orgs.retain(|o| Some(o.org.id) == p.pinned_org);
    }
    Ok((UserView::from(&user), orgs))
}

/// The caller as the Kilo Code CLI reads it after `kilo auth login` (contract §2a): email
/// and name (nested and at the top), organizations with roles, the organization to select.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    /// The user.
    pub user: UserView,
    /// The user's email (as `user.email`).
    pub email: String,
    /// The user's name (as `user.name`).
    pub name: String,
    /// `[{id, name, role, …}]`, as in `GET /api/users/me`.
    pub organizations: Vec<OrgMembershipView>,
    /// The organization a pinned credential acts for; none for a personal one.
    pub selected_organization_id: Option<uuid::Uuid>,
    /// Whether the credential may act for the user personally (false when pinned to an
    /// organization: the CLI then picks that organization).
    pub has_personal_account: bool,
}

/// `GET /api/profile`: the caller, in the shape the Kilo Code CLI reads.
#[utoipa::path(get, path = "/api/profile", tag = "users",
    responses((status = 200, body = Profile), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn profile(State(s): State<AppState>, auth: AuthUser) -> Result<Json<Profile>, ApiError> {
    let p = &auth.principal;
    let (user, organizations) = caller(&s, p).await?;
    Ok(Json(Profile {
        email: user.email.clone(),
        name: user.name.clone(),
        user,
        organizations,
        selected_organization_id: p.pinned_org,
        has_personal_account: p.pinned_org.is_none(),
    }))
}

/// `GET /api/user`: `{id, email}` of the caller. The Kilo Code CLI reads only the status (2xx:
/// the token is valid) before it ingests sessions.
#[utoipa::path(get, path = "/api/user", tag = "users",
    responses((status = 200, description = "`{id, email}`"), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn user(
    State(s): State<AppState>,
    auth: AuthUser,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (user, _) = caller(&s, &auth.principal).await?;
    Ok(Json(
        serde_json::json!({"id": user.id, "email": user.email}),
    ))
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
